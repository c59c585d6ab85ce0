"""Integrations of flash_ext with other libraries (each an optional dependency, imported only by its own module)."""
