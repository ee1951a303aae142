"""Calculator, file confinement and schema generation: the parts that need no model."""
from __future__ import annotations

import os
import time
from typing import Literal, Optional

import pytest

from app.tools.calc import CalcError, calculate
from app.tools.files import MAX_READ_BYTES, FileAccessError, confine, list_entries, read_text
from app.tools.schema import SchemaError, tool


@pytest.mark.parametrize("expr,value", [("1 + 2 * 3", 7), ("2 ** 10", 1024), ("7 // 2", 3), ("-3 % 5", 2),
                                        ("sqrt(16) + abs(-2)", 6.0), ("max(1, 9, 4)", 9), ("round(pi, 2)", 3.14)])
def test_calculator_computes(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize("expr,fragment", [
    ("__import__('os')", "not allowed"),
    ("().__class__", "not allowed"),
    ("open('/etc/passwd')", "not allowed"),
    ("x + 1", "not allowed"),
    ("[1, 2]", "not allowed"),
    ("9**9**9", "exponent"),
    ("10 ** 999 * 10 ** 999 * 10 ** 999 * 10 ** 999 * 10 ** 999", "too large"),
    ("-(" * 150 + "1" + ")" * 150, "nested deeper"),
    ("1 / 0", "division by zero"),
    ("sqrt(-1)", "sqrt"),
    ("1 +", "not an expression"),
    ("1" * 600, "longer than"),
])
def test_calculator_refuses_fast(expr, fragment):
    t0 = time.perf_counter()
    with pytest.raises(CalcError, match=fragment):
        calculate(expr)
    assert time.perf_counter() - t0 < 1.0


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    (r / "sub").mkdir(parents=True)
    (r / "a.txt").write_text("hello")
    (r / "sub" / "b.txt").write_text("deep")
    (tmp_path / "secret.txt").write_text("s3cret")
    return r


def test_reads_inside_root(root):
    assert read_text([str(root)], "a.txt") == "hello"
    assert read_text([str(root)], str(root / "sub" / "b.txt")) == "deep"
    assert list_entries([str(root)], ".") == ["a.txt", "sub/"]


@pytest.mark.parametrize("path", ["../secret.txt", "sub/../../secret.txt", "/etc/passwd", "~/.ssh/id_rsa"])
def test_escapes_refused(root, path):
    with pytest.raises(FileAccessError, match="outside the allowed folders"):
        read_text([str(root)], path)


def test_symlink_out_of_root_refused(root, tmp_path):
    os.symlink(tmp_path / "secret.txt", root / "link.txt")
    os.symlink(tmp_path, root / "linkdir")
    with pytest.raises(FileAccessError, match="outside"):
        read_text([str(root)], "link.txt")
    with pytest.raises(FileAccessError, match="outside"):
        list_entries([str(root)], "linkdir")


def test_devices_fifos_and_huge_files_refused(root):
    os.mkfifo(root / "pipe")
    with pytest.raises(FileAccessError, match="not a regular file"):
        read_text([str(root)], "pipe")
    with pytest.raises(FileAccessError, match="outside|not a regular"):
        read_text([str(root)], "/dev/zero")
    os.symlink("/dev/zero", root / "zero")
    with pytest.raises(FileAccessError, match="outside"):
        read_text([str(root)], "zero")
    with pytest.raises(FileAccessError, match="not a regular file"):
        read_text(["/dev"], "/dev/zero")
    (root / "big.txt").write_bytes(b"x" * (MAX_READ_BYTES + 1))
    with pytest.raises(FileAccessError, match="over the"):
        read_text([str(root)], "big.txt")


def test_no_roots_no_access(root):
    with pytest.raises(FileAccessError, match="no tool_roots"):
        confine([], str(root / "a.txt"))


def test_schema_from_signature_and_docstring():
    def search(query: str, k: int = 5, mode: Literal["fast", "exact"] = "fast", tags: Optional[list[str]] = None) -> str:
        """Search things.

        Args:
            query: what to look for
            k: how many results
        """
        return ""

    t = tool(search, side_effects=False)
    assert t.name == "search" and t.description == "Search things." and not t.side_effects
    props = t.parameters["properties"]
    assert props["query"] == {"type": "string", "description": "what to look for"}
    assert props["k"] == {"type": "integer", "description": "how many results"}
    assert props["mode"] == {"enum": ["fast", "exact"]}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert t.parameters["required"] == ["query"]
    assert t.spec()["function"]["name"] == "search"


def test_schema_errors_name_the_parameter():
    def no_doc(x: int) -> int:
        return x

    def untyped(x):
        """Doc."""

    def weird(x: dict):
        """Doc."""

    with pytest.raises(SchemaError, match="docstring"):
        tool(no_doc)
    with pytest.raises(SchemaError, match="'x' has no type annotation"):
        tool(untyped)
    with pytest.raises(SchemaError, match="parameter 'x'"):
        tool(weird)
