"""Cross-tokenizer distillation quality: a student with its OWN tokenizer learns from a cache built with another.

Shape notation::

    B  sequences per batch   T  teacher positions (--seq-len)   T_s  student positions   K  cached top-k
    V_t / V_s  teacher / student vocabularies

Corpus: the Python standard library's sources (``examples/_demo_corpus.py``: its file list, its byte-level BPE
trainer for the teacher's tokenizer, its Llama builder and teacher trainer). One document per file.

* Teacher tokenizer: the demo's byte-level BPE, ``--teacher-vocab`` (8192), trained on the training files.
* Student tokenizer: another byte-level BPE, ``--student-vocab`` (4096), trained with other settings: on the
  stdlib files AFTER the training corpus (another split), with the full 256-byte initial alphabet.
* One teacher (a Llama several times larger than the students) is trained once on the teacher's tokens;
  ``kdcache build --data train.jsonl --tokenizer TEACHER_TOK`` writes its top-k cache (``--record-offsets``
  when the build supports it; otherwise the teacher's byte spans are recomputed from the documents and checked
  against the cached ids, ``kdlib.crosstok.spans.teacher_offsets``).
* Per seed, two students from the same initial weights see the same student batches in the same order
  (``kdlib.crosstok.CrossTokLoader``), steps interleaved in a rotating order:
  ``ce`` (cross-entropy on the student's tokens) and ``crosstok`` (``crosstok_loss``: exact-id KD where the
  tokens coincide, ULD where only the boundary does, CE elsewhere).

Reported: held-out loss in bits per byte (the student's NLL of its own tokens over the UTF-8 bytes they cover,
so any two tokenizers compare) at equal steps, per seed and mean; the alignment mix (EXACT / ULD / NONE share of
the training positions); the median training-step time of crosstok over CE; and a loss-only row: forward +
backward of ``crosstok_loss`` vs ``F.cross_entropy`` on the same logits [B, T_s, V_s] (interleaved, medians).

Usage::

    python benchmarks/crosstok_quality.py --quick     # one seed, a few minutes on 2 CPU cores
    python benchmarks/crosstok_quality.py             # 3 seeds

Writes ``benchmarks/results/crosstok_quality{_quick}.{json,csv}``; the last stdout line is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "examples"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from _demo_corpus import count_params, make_model, pick_threads, stdlib_files, train_teacher  # noqa: E402
from _demo_corpus import train_tokenizer  # noqa: E402
from benchmarks._common import median, write_results  # noqa: E402


def log(msg: str) -> None:
    print(f"[crosstok_quality] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- data


def read_documents(files: list[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def train_student_tokenizer(out_dir: Path, documents: list[str], vocab_size: int) -> Path:
    """A byte-level BPE with the full byte alphabet, trained on ``documents`` (another split than the teacher's)."""
    if (out_dir / "tokenizer.json").exists():
        return out_dir
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=3)
    tok.train_from_iterator(documents, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return out_dir


def build_cache(teacher_dir: Path, tok_dir: Path, data: Path, out: Path, args) -> tuple[Path, bool]:
    """``kdcache build`` of the teacher's top-k cache; (dir, whether it holds the text offsets)."""
    if (out / "manifest.json").exists():
        return out, "token_doc" in json.loads((out / "manifest.json").read_text())["arrays"]
    cmd = [sys.executable, "-m", "cache_server", "build", "--teacher", str(teacher_dir), "--data", str(data),
           "--tokenizer", str(tok_dir), "--seq-len", str(args.seq_len), "--topk", str(args.topk), "--out", str(out),
           "--batch-size", "16", "--max-sequences", str(args.cache_sequences)]
    cmd.append("--record-offsets")  # the byte spans the student alignment is checked against
    log("$ kdcache " + " ".join(cmd[3:]))
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"kdcache build failed: {done.stderr.strip()[-600:]}")
    return out, True


def heldout_windows(documents: list[str], tok_dir: Path, seq_len: int, max_windows: int):
    """Held-out student windows: ids [n, T_s], labels [n, T_s], and the UTF-8 bytes the labels cover [n, T_s]."""
    from kdlib.crosstok import encode_stream
    from kdlib.crosstok.vocab_map import load_tokenizer_file, tokenizer_eos_id

    tok, _ = load_tokenizer_file(tok_dir)
    stream = encode_stream(documents, tok, tokenizer_eos_id(tok_dir, tok))
    nbytes = (stream.token_bytes[:, 1].astype(np.int64) - stream.token_bytes[:, 0]) * ~stream.is_eos
    n = min(max_windows, (len(stream.ids) - 1) // seq_len)
    ids = torch.from_numpy(stream.ids[: n * seq_len].reshape(n, seq_len))
    labels = torch.from_numpy(stream.ids[1 : n * seq_len + 1].reshape(n, seq_len))
    return ids, labels, torch.from_numpy(nbytes[1 : n * seq_len + 1].reshape(n, seq_len))


@torch.no_grad()
def bits_per_byte(model, ids: torch.Tensor, labels: torch.Tensor, nbytes: torch.Tensor, batch_size: int = 16) -> float:
    """Σ NLL (bits) of the next tokens over Σ the bytes they cover."""
    was = model.training
    model.eval()
    nll = 0.0
    for s in range(0, len(ids), batch_size):
        logits = model(input_ids=ids[s : s + batch_size]).logits.float()
        nll += F.cross_entropy(logits.flatten(0, 1), labels[s : s + batch_size].flatten(), reduction="sum").item()
    model.train(was)
    return nll / math.log(2) / float(nbytes.sum())


# ----------------------------------------------------------------------------------------------- training


def loss_row(batch: dict, vocab_map: torch.Tensor, vocab: int, kd: dict, reps: int) -> dict[str, float]:
    """Forward + backward of crosstok_loss vs cross-entropy on the same random logits [B, T_s, V_s]."""
    from kdlib.crosstok import crosstok_loss_from_batch

    torch.manual_seed(0)
    z = torch.randn(*batch["input_ids"].shape, vocab, requires_grad=True)
    fns = {"ce": lambda: F.cross_entropy(z.flatten(0, 1), batch["labels"].flatten()),
           "crosstok": lambda: crosstok_loss_from_batch(z, batch, vocab_map, **kd)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(reps + 2):
        for name in (list(fns) if i % 2 else list(fns)[::-1]):
            t0 = time.perf_counter()
            fns[name]().backward()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
            z.grad = None
    ce, ct = median(times["ce"]), median(times["crosstok"])
    return {"ce_ms": round(1e3 * ce, 3), "crosstok_ms": round(1e3 * ct, 3), "crosstok_over_ce": round(ct / ce, 3),
            "shape": list(z.shape), "threads": torch.get_num_threads()}


def loss_rows(batch: dict, vocab_map: torch.Tensor, vocab: int, kd: dict, reps: int) -> list[dict[str, float]]:
    """:func:`loss_row` with this run's torch threads and with one (a busy 2-core box pays per-op barriers)."""
    threads = torch.get_num_threads()
    rows = [loss_row(batch, vocab_map, vocab, kd, reps)]
    if threads != 1:
        torch.set_num_threads(1)
        rows.append(loss_row(batch, vocab_map, vocab, kd, reps))
        torch.set_num_threads(threads)
    return rows


# long: one loop owns the lockstep models, the rotating order, the timing and the evaluation points
def train_seed(seed: int, make_loader, heldout, vocab: int, args) -> dict[str, Any]:
    from kdlib.crosstok import crosstok_loss_from_batch

    loader = make_loader(seed)

    kd = {"ce_weight": args.ce_weight, "kd_weight": args.kd_weight, "temperature": args.temperature,
          "tail": args.tail}
    models, opts = {}, {}
    for mode in ("ce", "crosstok"):
        models[mode] = make_model(vocab, hidden=args.student_hidden, layers=args.student_layers,
                                  seq_len=loader.student_seq_len, seed=1000 + seed)
        opts[mode] = torch.optim.AdamW(models[mode].parameters(), lr=args.lr)
    first = bits_per_byte(models["ce"], *heldout)
    runs = {m: {"curve": [(0, first)], "step_s": []} for m in models}
    mix = np.zeros(3)
    it = (batch for _ in iter(int, 1) for batch in loader)  # epochs back to back (the loader rolls them)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = next(it)
        mix += np.bincount(batch["align"][batch["labels"] != -100].numpy(), minlength=3)
        ids = batch["input_ids"]
        for mode in (["ce", "crosstok"] if step % 2 else ["crosstok", "ce"]):
            t0 = time.perf_counter()
            logits = models[mode](input_ids=ids).logits  # [B, T_s, V_s]
            if mode == "ce":
                loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
            else:
                loss = crosstok_loss_from_batch(logits, batch, loader.vocab_map, **kd)
            opts[mode].zero_grad(set_to_none=True)
            loss.backward()
            opts[mode].step()
            runs[mode]["step_s"].append(time.perf_counter() - t0)
        if step % args.eval_every == 0 or step == args.steps:
            for mode in models:
                runs[mode]["curve"].append((step, bits_per_byte(models[mode], *heldout)))
            log(f"seed {seed} step {step}/{args.steps} ({time.perf_counter() - started:.0f}s): " +
                ", ".join(f"{m} {runs[m]['curve'][-1][1]:.4f} bpb" for m in models))
    runs["mix"] = (mix / mix.sum()).tolist()
    runs["loss_row"] = loss_rows(batch, loader.vocab_map, vocab, kd, args.loss_reps)
    return runs


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed, fewer steps (a few minutes on 2 CPU cores)")
    p.add_argument("--work-dir", type=Path, default=REPO / "demo_out" / "crosstok_quality")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="student seeds (default 0 1 2; quick: 0)")
    p.add_argument("--steps", type=int, default=None, help="student steps (default 400; quick 150)")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--corpus-bytes", type=int, default=None, help="training text (default 2 MB; quick 1 MB)")
    p.add_argument("--teacher-vocab", type=int, default=8192)
    p.add_argument("--student-vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=128, help="teacher positions per cached sequence")
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--teacher-hidden", type=int, default=192)
    p.add_argument("--teacher-layers", type=int, default=2)
    p.add_argument("--teacher-steps", type=int, default=None, help="default 600; quick 300")
    p.add_argument("--student-hidden", type=int, default=64)
    p.add_argument("--student-layers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ce-weight", type=float, default=0.5)
    p.add_argument("--kd-weight", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--tail", default="bucket", choices=["bucket", "renormalize"])
    p.add_argument("--heldout-windows", type=int, default=48)
    p.add_argument("--loss-reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.steps = args.steps or (150 if args.quick else 400)
    args.eval_every = args.eval_every or max(1, args.steps // 5)
    args.corpus_bytes = args.corpus_bytes or (1_000_000 if args.quick else 2_000_000)
    args.teacher_steps = args.teacher_steps or (300 if args.quick else 600)
    args.cache_sequences = args.batch_size * args.steps
    return args


def prepare(args):
    """Tokenizers, teacher, cache, held-out windows, loader (each reused when already in the work dir)."""
    from kdlib.crosstok import CrossTokLoader, encode_stream
    from kdlib.crosstok.vocab_map import load_tokenizer_file, tokenizer_eos_id

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    train_files = stdlib_files(args.corpus_bytes)
    documents = read_documents(train_files)
    heldout_docs = read_documents(stdlib_files(200_000, skip_bytes=args.corpus_bytes + 1))
    other_split = read_documents(stdlib_files(args.corpus_bytes, skip_bytes=args.corpus_bytes + 200_001))
    teacher_tok = train_tokenizer(work / f"teacher_tok_{args.teacher_vocab}", train_files, args.teacher_vocab)
    student_tok = train_student_tokenizer(work / f"student_tok_{args.student_vocab}", other_split or documents,
                                          args.student_vocab)
    ttok, _ = load_tokenizer_file(teacher_tok)
    tokens = encode_stream(documents, ttok, tokenizer_eos_id(teacher_tok, ttok)).ids.astype(np.uint16)
    name = f"teacher_{args.teacher_layers}x{args.teacher_hidden}_{args.teacher_steps}steps"
    teacher_dir = train_teacher(work, tokens, ttok.get_vocab_size(), args.seq_len, args.teacher_steps,
                                hidden=args.teacher_hidden, layers=args.teacher_layers, name=name)
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        (teacher_dir / fname).write_bytes((teacher_tok / fname).read_bytes())
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    cache_dir, stored = build_cache(teacher_dir, teacher_tok, data, work / f"cache_{name}_{args.cache_sequences}",
                                    args)

    def make_loader(seed: int) -> CrossTokLoader:
        return CrossTokLoader(cache_dir, documents, student_tok, args.batch_size, shuffle=True, seed=seed, rank=0,
                              world_size=1, vocab_map_dir=work / "vocab_maps")

    t0 = time.perf_counter()
    loader = make_loader(0)
    setup_s = time.perf_counter() - t0
    heldout = heldout_windows(heldout_docs, student_tok, loader.student_seq_len, args.heldout_windows)
    stok, _ = load_tokenizer_file(student_tok)
    info = {"teacher_dir": str(teacher_dir), "cache_offsets_stored": stored, "loader_setup_s": round(setup_s, 2),
            "student_seq_len": loader.student_seq_len, "teacher_vocab": ttok.get_vocab_size(),
            "student_vocab": stok.get_vocab_size(), "vocab_mapped": int((loader.vocab_map >= 0).sum()),
            "train_documents": len(documents), "train_bytes": sum(len(d.encode()) for d in documents),
            "heldout_bytes": int(heldout[2].sum())}
    return make_loader, heldout, info, teacher_dir


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(pick_threads(args.threads))
    started = time.perf_counter()
    make_loader, heldout, info, teacher_dir = prepare(args)
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, local_files_only=True)
    log(f"teacher {count_params(teacher) / 1e6:.2f}M params; {info}")
    runs = {seed: train_seed(seed, make_loader, heldout, info["student_vocab"], args) for seed in args.seeds}
    final = {m: [r[m]["curve"][-1][1] for r in runs.values()] for m in ("ce", "crosstok")}
    gains = [round(c - k, 4) for c, k in zip(final["ce"], final["crosstok"])]
    step_ratio = [median(r["crosstok"]["step_s"]) / median(r["ce"]["step_s"]) for r in runs.values()]
    student = make_model(info["student_vocab"], hidden=args.student_hidden, layers=args.student_layers,
                         seq_len=info["student_seq_len"])
    summary = {
        "benchmark": "crosstok_quality", "quick": args.quick, "seeds": args.seeds, "steps": args.steps,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "topk": args.topk,
        "kd": {"ce_weight": args.ce_weight, "kd_weight": args.kd_weight, "temperature": args.temperature,
               "tail": args.tail},
        "teacher": {"params": count_params(teacher), "layers": args.teacher_layers, "hidden": args.teacher_hidden,
                    "steps": args.teacher_steps},
        "student": {"params": count_params(student), "layers": args.student_layers, "hidden": args.student_hidden},
        **info,
        "heldout_bpb_equal_steps": {m: {"per_seed": [round(v, 4) for v in vs], "mean": round(float(np.mean(vs)), 4)}
                                    for m, vs in final.items()},
        "gain_bpb_vs_ce_per_seed": gains,
        "crosstok_beats_ce_every_seed": all(g > 0 for g in gains),
        "alignment_mix_none_uld_exact": [round(float(np.mean([r["mix"][i] for r in runs.values()])), 4)
                                         for i in range(3)],
        "train_step_time_over_ce": round(float(np.mean(step_ratio)), 3),
        "loss_only": runs[args.seeds[0]]["loss_row"],
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    rows = [{"seed": seed, "mode": m, "step": s, "heldout_bpb": round(v, 5)}
            for seed, r in runs.items() for m in ("ce", "crosstok") for s, v in r[m]["curve"]]
    write_results("crosstok_quality_quick" if args.quick else "crosstok_quality", summary, rows)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
