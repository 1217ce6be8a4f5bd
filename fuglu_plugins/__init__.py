"""The plugins bundled with fuglu: archive, attachment, clamav, spamassassin, debug, skip."""
