"""Tools from MCP servers (app/tools/mcp.py): a real MCP server (the SDK's MCPServer, over stdio,
tests/app/tools/mcp_server.py) named in <data dir>/mcp.toml; its tools join the registry with
their schemas, under the policy (side-effecting unless marked read-only), their results are data,
and a server that will not start or dies mid-call is reported while the turn goes on."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from app.config import Settings
from app.tools import mcp
from app.tools.calling import ToolLoop
from app.tools.policy import Policy
from app.tools.registry import ToolRegistry

SERVER = Path(__file__).with_name("mcp_server.py")


def mcp_log_dir() -> Path:
    from models import paths

    return paths.data_dir() / "logs"


def _config(home: Path, body: str) -> Path:
    from models import paths

    path = paths.data_dir() / "mcp.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    return path


def _server(name: str = "test", extra: str = "", args: str = "") -> str:
    return (f'[servers.{name}]\ncommand = "{sys.executable}"\nargs = ["{SERVER}"{args}]\n'
            f'read_only = ["add"]\ntimeout = 30\n{extra}')


@pytest.fixture(autouse=True)
def _fresh_pool():
    yield
    mcp.close_all()


def test_mcp_tools_join_the_registry_with_their_schemas_and_the_policy(crofter_home):
    _config(crofter_home, _server())
    reg = ToolRegistry.for_settings(Settings())
    assert reg.problems == []
    assert {"add", "shout_text", "fail", "crash"} <= set(reg.tools) and "calculator" in reg.tools
    add = reg.get("add")
    assert add.parameters["properties"]["a"]["type"] == "integer" and add.parameters["required"] == ["a", "b"]
    assert add.meta["origin"] == "mcp server test" and add.meta["mcp_tool"] == "add"
    assert reg.get("shout_text").meta["mcp_tool"] == "shout-text"   # MCP names made safe for the grammar
    policy = Policy()
    assert policy.decide(add, tainted=False) == "allow"              # marked read-only by the user
    assert policy.decide(reg.get("shout_text"), tainted=False) == "ask"  # everything else: asked first
    assert add.fn(a=2, b=40) == "42"
    with pytest.raises(RuntimeError, match="fail"):
        reg.get("fail").fn(reason="no")


def test_an_mcp_result_is_data_a_side_effect_after_it_is_asked(crofter_home, engine):
    _config(crofter_home, _server())
    reg = ToolRegistry.for_settings(Settings())
    asked = []

    def approve(t, args, tainted):
        asked.append((t.name, tainted))
        return False

    from app.session import ChatSession

    from app.engine import Sampling

    loop = ToolLoop(ChatSession(engine, Sampling()), reg, Policy({"shout_text": "allow"}), approve)
    call = loop._call("shout_text", {"text": "hi"}, False, {})
    assert call.status == "ok" and "IGNORE YOUR RULES" in call.result
    # The text asked for deletion; the model may now request a side-effecting call: it is asked, not run.
    again = loop._call("shout_text", {"text": "delete"}, True, {})
    assert again.status == "denied" and asked == [("shout_text", True)]


def test_a_server_that_will_not_start_is_reported_and_the_others_still_serve(crofter_home):
    _config(crofter_home, _server("broken", args=', "--die-on-start"') + "\n" + _server("good")
            + '\n[servers.missing]\ncommand = "/nonexistent/mcp-server"\n')
    reg = ToolRegistry.for_settings(Settings())
    assert reg.get("add") is not None and reg.get("add").fn(a=1, b=2) == "3"
    text = "\n".join(reg.problems)
    assert "servers.broken: did not start" in text and "mcp-broken.log" in text
    assert "servers.missing: did not start" in text
    assert "this server refuses to start" in (mcp_log_dir() / "mcp-broken.log").read_text()


def test_a_server_dying_mid_call_is_an_error_the_model_sees_and_it_restarts_next_turn(crofter_home, engine):
    _config(crofter_home, _server())
    reg = ToolRegistry.for_settings(Settings())
    from app.session import ChatSession

    from app.engine import Sampling

    loop = ToolLoop(ChatSession(engine, Sampling()), reg, Policy({"crash": "allow"}), lambda *a: True)
    call = loop._call("crash", {}, False, {})
    assert call.status == "error" and "stopped during the call" in call.result
    after = loop._call("add", {"a": 1, "b": 1}, False, {})
    assert after.status == "error" and "not running" in after.result  # this turn's server is gone
    again = ToolRegistry.for_settings(Settings())                      # the next turn starts it again
    assert again.problems == [] and again.get("add").fn(a=1, b=1) == "2"


@pytest.mark.parametrize("body,needle", [
    ("[servers.x\n", "not readable TOML"),
    ('[servers.x]\nargs = ["a"]\n', "servers.x: command: missing"),
    ('[servers.x]\ncommand = "c"\nargz = []\n', "servers.x: unknown key 'argz'"),
    ('[servers.x]\ncommand = "c"\ntimeout = -1\n', "servers.x: timeout: expected seconds > 0"),
    ('[servers.x]\ncommand = "c"\nenv = {A = 1}\n', "servers.x: env: expected a table of strings"),
    ('[other]\nx = 1\n', "unknown key 'other'"),
])
def test_a_bad_mcp_toml_is_reported_naming_the_file_and_key(crofter_home, body, needle):
    path = _config(crofter_home, body)
    specs, problems = mcp.load_specs(path)
    assert specs == [] and any(needle in p and str(path) in p for p in problems), problems
    reg = ToolRegistry.for_settings(Settings())  # the chat's own tools still come
    assert "calculator" in reg.tools and any(needle in p for p in reg.problems)
