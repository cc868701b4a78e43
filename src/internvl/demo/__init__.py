"""The demo model's synthetic world: scenes and Q&A (`scenes`), the training/evaluation data (`dataset`), its
byte-level BPE tokenizer (`tokenizer`) and the exact-match / IoU scorer (`scoring`)."""
