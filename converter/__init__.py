"""converter: see ../shared/DESIGN.md; built by its own issue."""
