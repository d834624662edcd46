"""The ground floor's model stack: the MiniCPM4-architecture decoder, tokenizer, packed data and WSD trainer.
Imports only ``core`` and ``kernels``; nothing of the data side."""
