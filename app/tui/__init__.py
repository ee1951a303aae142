"""Textual screens and widgets of the chat app; the logic lives in app.chat."""
