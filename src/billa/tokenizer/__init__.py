"""Tokenizers: SentencePiece training, HF tokenizer directories, vocabulary expansion (from texts, not files)."""
