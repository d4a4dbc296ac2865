"""The serve room: the FastAPI app factory and what its routes delegate to."""
