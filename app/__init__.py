"""crofter's chat app: CLI entry, engine over llama.cpp, sessions, settings (and soon the TUI)."""

__version__ = "0.1.0"
