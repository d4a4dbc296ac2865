"""The Triton kernels compile for Ampere (sm_80) and Hopper (sm_90a) without spilling registers.

Shape notation: V vocabulary, K teacher top-k.

No GPU is needed: ``triton.compile`` lowers to PTX for a target capability and the ptxas bundled with
triton reports registers and spills (``-v``), with the flags Triton itself passes. This guards the launch
configuration (BLOCK_V = 4096, 8 warps at LLM vocabularies) against a kernel change that blows up register
use — e.g. the [BLOCK_K, BLOCK_V] membership tile the forward used to build (168 registers at 1024 x 4
warps, 222 at 4096 x 8) — which the interpreter-run tests cannot see.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler")

# registers per thread: at most 96 keeps >= 2 programs of 8 warps per SM (65536 registers)
MAX_REGISTERS = 96
VOCAB, TOPK = 131072, 64
KERNELS = ("_row_stats_kernel", "_exact_tail_kernel", "_write_grad_kernel")
CAPABILITIES = (80, 90)
LOGITS_TYPES = ("bf16", "fp32")

# Run in a fresh interpreter without TRITON_INTERPRET: the interpreter-run tests patch triton.language
# while they execute kernels, and a compile in the same process after them fails.
_COMPILE_SCRIPT = r"""
import inspect, json, re, subprocess, sys, warnings
warnings.simplefilter("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia import compiler as nv
from triton.compiler import ASTSource
from triton_kernels import sparse_kd

vocab, topk, kernels, capabilities, logits_types = json.loads(sys.argv[1])
cfg = sparse_kd.launch_config(vocab, topk)


def signature(kernel, logits_type):
    types = {"z_ptr": "*" + logits_type, "grad_ptr": "*" + logits_type, "ids_ptr": "*i64",
             "sorted_ids_ptr": "*i64", "labels_ptr": "*i64", "needs_exact_ptr": "*i8", "V": "i32", "K": "i32"}
    sig = {}
    for name, param in inspect.signature(kernel.fn).parameters.items():
        if "constexpr" in str(param.annotation):
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        else:
            sig[name] = "*fp32" if name.endswith("_ptr") else "i64" if name.endswith("stride") else "fp32"
    return sig


results = {}
for name in kernels:
    kernel = getattr(sparse_kd, name)
    constexprs = {"BLOCK_V": cfg.block_v}
    if name != "_exact_tail_kernel":
        constexprs.update(SCALED=True, BLOCK_K=cfg.block_k)
    if name == "_row_stats_kernel":
        constexprs["NEED_TAIL"] = True
    for capability in capabilities:
        for logits_type in logits_types:
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature(kernel, logits_type),
                                                constexprs=constexprs),
                                      target=GPUTarget("cuda", capability, 32), options={"num_warps": cfg.num_warps})
            # the flags Triton itself passes to ptxas, plus -v for the usage report
            log = subprocess.run([nv.get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                                  "--gpu-name=" + nv.sm_arch_from_capability(capability), "-", "-o", "/dev/null"],
                                 input=compiled.asm["ptx"], capture_output=True, text=True, check=True).stderr
            registers = int(re.search(r"Used (\d+) registers", log).group(1))
            spilled = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
            results[f"{name}/{capability}/{logits_type}"] = [registers, spilled]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def ptxas_usage() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = json.dumps([VOCAB, TOPK, KERNELS, CAPABILITIES, LOGITS_TYPES])
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, args], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    if proc.returncode != 0:
        if "ptxas" in proc.stderr and ("No such file" in proc.stderr or "not found" in proc.stderr):
            pytest.skip("this triton build has no ptxas")
        raise AssertionError(f"compiling the kernels for sm_80/sm_90 failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("logits_type", LOGITS_TYPES)
@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("kernel_name", KERNELS)
def test_kernels_compile_without_spills(ptxas_usage, kernel_name, capability, logits_type):
    registers, spilled = ptxas_usage[f"{kernel_name}/{capability}/{logits_type}"]
    assert spilled == 0, f"{kernel_name} spills {spilled} bytes on sm_{capability}"
    assert registers <= MAX_REGISTERS, f"{kernel_name} uses {registers} registers on sm_{capability}"
