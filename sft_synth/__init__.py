"""The middle floor's UltraChat v2-style SFT synthesis (seeds, dialogues, filters, the dataset format);
``generation/`` holds the local generation engine it runs on. The job is ``pipelines.ultrachat``."""
