"""Data: shard sets, ingest, SentencePiece text, grain pipelines, the shapes dataset."""
