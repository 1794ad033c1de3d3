"""ComfyUI's own frontend as the judge of the UI format: load a workflow in headless Chromium and
ask the app for its API prompt (``app.graphToPrompt()``), through the DevTools protocol.

Standard library only (a minimal WebSocket client), so the e2e script needs no extra package.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request


class WebSocket:
    """Just enough of RFC 6455 for the DevTools protocol: text frames, client masking."""

    def __init__(self, url: str, timeout: float = 60):
        host_port, path = url.removeprefix("ws://").split("/", 1)
        host, port = host_port.split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        response = b""
        while b"\r\n\r\n" not in response:
            response += self.sock.recv(4096)
        if b" 101 " not in response.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"WebSocket handshake failed: {response[:200]!r}")
        self.buffer = response.split(b"\r\n\r\n", 1)[1]

    def send(self, text: str) -> None:
        data, mask = text.encode(), os.urandom(4)
        header = bytes([0x81])
        if len(data) < 126:
            header += bytes([0x80 | len(data)])
        elif len(data) < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", len(data))
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", len(data))
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def _read(self, count: int) -> bytes:
        while len(self.buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("DevTools connection closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def receive(self) -> str:
        """The next text message (binary messages, such as image previews, are skipped)."""
        message = b""
        while True:
            first, second = self._read(2)
            length = second & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(length)
            if first & 0x0F == 0x8:
                raise ConnectionError("WebSocket closed by the server")
            if first & 0x0F in (0x1, 0x0):
                message += payload
                if first & 0x80:
                    return message.decode()


class Frontend:
    """Headless Chromium showing ComfyUI at `url`.

    Args:
        chromium: the browser.
        url: the ComfyUI server.
        port: Chromium's DevTools port.
        object_info: if given, a function that rewrites the server's /object_info before the page
            sees it (to show the frontend another core's node schemas).
    """

    def __init__(self, chromium: str, url: str, port: int = 9333, object_info=None):
        self.profile = tempfile.mkdtemp(prefix="dmp-chromium-")
        self.process = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={port}",
             f"--user-data-dir={self.profile}", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5) as response:
                    pages = [p for p in json.loads(response.read()) if p["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium's DevTools did not answer")
            time.sleep(0.5)
        self.socket = WebSocket(pages[0]["webSocketDebuggerUrl"])
        self.next_id, self.replies, self.object_info = 0, {}, object_info
        self.errors: list[str] = []  # the page's console errors, uncaught exceptions and failed requests
        for domain in ("Runtime", "Network"):
            self.call(f"{domain}.enable")
        if object_info is not None:
            self.call("Fetch.enable", {"patterns": [{"urlPattern": "*object_info*", "requestStage": "Response"}]})
        self.call("Page.navigate", {"url": url})
        self._wait_for_app()

    def call(self, method: str, params: dict | None = None) -> dict:
        """Send a DevTools command and return its result (events that arrive meanwhile are handled)."""
        self.next_id += 1
        message_id = self.next_id
        self.socket.send(json.dumps({"id": message_id, "method": method, "params": params or {}}))
        while message_id not in self.replies:
            message = json.loads(self.socket.receive())
            if "id" in message:
                self.replies[message["id"]] = message
            else:
                self._on_event(message["method"], message.get("params", {}))
        reply = self.replies.pop(message_id)
        if "error" in reply:
            raise RuntimeError(f"DevTools {method}: {reply['error']}")
        return reply["result"]

    def _on_event(self, method: str, params: dict) -> None:
        if method == "Fetch.requestPaused":
            body = self.call("Fetch.getResponseBody", {"requestId": params["requestId"]})
            text = base64.b64decode(body["body"]) if body["base64Encoded"] else body["body"].encode()
            patched = json.dumps(self.object_info(json.loads(text))).encode()
            self.call("Fetch.fulfillRequest", {
                "requestId": params["requestId"], "responseCode": 200, "body": base64.b64encode(patched).decode(),
                "responseHeaders": [{"name": "Content-Type", "value": "application/json"}]})
        elif method == "Runtime.consoleAPICalled" and params["type"] == "error":
            self.errors.append("console: " + " ".join(str(a.get("value", a.get("description", "")))
                                                      for a in params["args"])[:300])
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append("exception: " + details.get("exception", {}).get("description", details["text"])[:300])
        elif method == "Network.responseReceived" and params["response"]["status"] >= 400:
            self.errors.append(f"HTTP {params['response']['status']}: {params['response']['url']}")

    def evaluate(self, expression: str):
        """The JSON value of a JavaScript expression (promises awaited)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def _wait_for_app(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate("!!(window.app && window.app.graph && window.app.vueAppReady !== false)"):
            if time.monotonic() > deadline:
                raise TimeoutError("the ComfyUI frontend did not start")
            time.sleep(1)
        time.sleep(2)  # node definitions arrive right after the app object

    @property
    def version(self) -> str:
        """The frontend's version (comfyui-frontend-package)."""
        return self.evaluate("window.__COMFYUI_FRONTEND_VERSION__") or "unknown"

    def api_prompt(self, workflow: dict) -> dict:
        """What ComfyUI's frontend sends for `workflow`: {id: {class_type, inputs}}."""
        script = ("(async () => { await window.app.loadGraphData(" + json.dumps(workflow) + ");"
                  " const p = await window.app.graphToPrompt(); return JSON.stringify(p.output); })()")
        return json.loads(self.evaluate(script))

    def saved_workflow(self) -> dict:
        """The loaded graph as the frontend saves it (its own widgets_values, and widgets_values_named
        where it writes them)."""
        return json.loads(self.evaluate("JSON.stringify(window.app.graph.serialize())"))

    def set_viewport(self, width: int, height: int) -> None:
        """Lay the page out at `width` x `height` CSS pixels (screenshots are that size)."""
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False})
        time.sleep(1)  # the app resizes its canvas on the next frame

    def screenshot(self, path) -> None:
        """Save what the page shows as a PNG file."""
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as file:
            file.write(base64.b64decode(data))

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


def with_core_snapshot(live: dict, snapshot: dict) -> dict:
    """The server's /object_info with the core nodes' schemas replaced by a snapshot's (another core
    version's): names, descriptions and modules stay the live ones, file combos list the live files."""
    info = dict(live)
    for name, entry in snapshot.items():
        entry = json.loads(json.dumps(entry))
        old = live.get(name, {})
        for category, specs in entry["input"].items():
            for input_name, spec in specs.items() if isinstance(specs, dict) else ():
                if isinstance(spec[0], dict) and "files" in spec[0]:
                    real = old["input"][category][input_name]
                    files = real[0] if isinstance(real[0], list) else real[1].get("options", [])
                    options = spec[1] if len(spec) > 1 else {}
                    specs[input_name] = (["COMBO", {**options, "options": files}] if "options" in options
                                         else [files, *spec[1:]])
        info[name] = {**old, **entry, "output_is_list": [False] * len(entry["output"]),
                      "output_tooltips": [None] * len(entry["output"])}
    return info


def compare(ours: dict, theirs: dict, node_info: dict) -> list[str]:
    """Differences between our API conversion and the frontend's. Titles are ignored, and so are
    inputs a node does not declare (the frontend adds display widgets, e.g. Preview Any's
    'preview', which the server ignores); a dotted input (a DynamicCombo's, 'format.codec') counts as
    its root's. List values newer frontends wrap as {'__value__': [...]} are unwrapped."""
    problems = []
    for node_id in sorted(set(ours) | set(theirs), key=lambda k: int(k) if k.isdigit() else k):
        a, b = ours.get(node_id), theirs.get(node_id)
        if a is None or b is None:
            problems.append(f"node {node_id}: only in {'the frontend' if a is None else 'ours'}")
            continue
        declared = {name for specs in node_info[a["class_type"]]["input"].values() for name in specs}
        sent = {k: _unwrapped(v) for k, v in b["inputs"].items() if k.split(".")[0] in declared}
        if a["class_type"] != b["class_type"] or a["inputs"] != sent:
            problems.append(f"node {node_id} ({a['class_type']}): ours {a['inputs']} != frontend's {sent}")
    return problems


def _unwrapped(value):
    return value["__value__"] if isinstance(value, dict) and set(value) == {"__value__"} else value
