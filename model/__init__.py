"""The compact model stack: MiniCPM4-architecture proxy, tokenizer, packed data, WSD trainer."""
