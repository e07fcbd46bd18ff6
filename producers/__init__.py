"""Producers: the one library every entry point uses to write to the SKU command log."""
