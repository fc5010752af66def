"""Tokenizers: SentencePiece training, HF tokenizer directories, (later) vocabulary expansion."""
