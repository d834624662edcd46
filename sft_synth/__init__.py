"""UltraChat v2-style SFT data synthesis; generation/ holds the local generation engine it runs on."""
