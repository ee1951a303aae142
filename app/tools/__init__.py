"""Tools the chat model may call: typed Python functions with docstrings.

A tool's JSON schema comes from its signature and docstring (`schema.tool`);
built-ins register through the same entry-point group, `crofter.tools`, that
third-party packages use (`registry.ToolRegistry.discover`).
"""
