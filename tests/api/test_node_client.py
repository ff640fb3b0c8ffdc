"""The official `openai` npm client against a real server: a JSON-schema answer, tools with a
required choice streamed through the client's chunk accumulation, and `responses.create`, streamed
and not. Skipped when node or npm is missing or the package cannot be installed."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

SCRIPT = r"""
import OpenAI from "openai";
const client = new OpenAI({ baseURL: process.env.BASE_URL, apiKey: "none", maxRetries: 0 });
const model = process.env.MODEL;
const schema = { type: "object", additionalProperties: false, required: ["city", "score"],
  properties: { city: { type: "string", maxLength: 10 }, score: { type: "integer", minimum: 0, maximum: 9 } } };
const out = {};
const chat = await client.chat.completions.create({ model, max_tokens: 120, temperature: 1.0,
  messages: [{ role: "user", content: "Rate Paris" }],
  response_format: { type: "json_schema", json_schema: { name: "rating", schema, strict: true } } });
out.json = JSON.parse(chat.choices[0].message.content);
out.jsonFinish = chat.choices[0].finish_reason;
const tools = [{ type: "function", function: { name: "get_weather", parameters: {
  type: "object", properties: { city: { type: "string", maxLength: 10 } }, required: ["city"] } } }];
const stream = await client.chat.completions.create({ model, max_tokens: 120, temperature: 1.0, stream: true,
  messages: [{ role: "user", content: "Weather in Paris?" }], tools, tool_choice: "required" });
const calls = {};
let finish = null;
for await (const chunk of stream) {
  const choice = chunk.choices[0];
  for (const delta of choice.delta.tool_calls ?? []) {
    calls[delta.index] ??= { id: "", name: "", arguments: "" };
    calls[delta.index].id += delta.id ?? "";
    calls[delta.index].name += delta.function?.name ?? "";
    calls[delta.index].arguments += delta.function?.arguments ?? "";
  }
  finish = choice.finish_reason ?? finish;
}
out.calls = Object.values(calls).map((c) => ({ ...c, arguments: JSON.parse(c.arguments) }));
out.callsFinish = finish;
const response = await client.responses.create({ model, input: "Say hi", max_output_tokens: 5, temperature: 0 });
out.responseStatus = response.status;
out.responseText = response.output_text;
const events = [];
for await (const event of await client.responses.create({ model, input: "Say hi", max_output_tokens: 5,
                                                          temperature: 0, stream: true })) {
  events.push(event.type);
}
out.events = events;
console.log(JSON.stringify(out));
"""


@pytest.fixture(scope="module")
def node_project(tmp_path_factory):
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for the npm client test")
    directory = tmp_path_factory.mktemp("node-client")
    (directory / "package.json").write_text(json.dumps({"name": "client-test", "private": True, "type": "module"}))
    try:
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent", "openai"], cwd=directory,
                       check=True, capture_output=True, timeout=180)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"npm could not install the openai package: {exc}")
    (directory / "client.mjs").write_text(SCRIPT)
    return directory


def test_the_npm_client(long_server, node_project):
    result = subprocess.run(["node", "client.mjs"], cwd=node_project, capture_output=True, text=True, timeout=300,
                            env={"BASE_URL": f"{long_server.url}/v1", "MODEL": long_server.engine.model_name,
                                 "PATH": os.environ.get("PATH", "")})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["jsonFinish"] == "stop" and set(out["json"]) == {"city", "score"} and 0 <= out["json"]["score"] <= 9
    assert out["callsFinish"] == "tool_calls" and out["calls"]
    assert all(c["id"].startswith("call_") and c["name"] == "get_weather" and isinstance(c["arguments"]["city"], str)
               for c in out["calls"])
    assert out["responseStatus"] == "incomplete" and out["responseText"]
    assert out["events"][0] == "response.created" and out["events"][-1] == "response.incomplete"
    assert "response.output_text.delta" in out["events"]
