"""The model store: where crofter keeps models, what it knows about them, and how it gets them.

Imports nothing from the rest of crofter (DESIGN.md: `models` sits at the bottom).
"""
