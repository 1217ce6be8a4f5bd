"""fuglu's bundled plugins (loaded by alias: archive, attachment, clamav, spamassassin, debug,
skip)."""
