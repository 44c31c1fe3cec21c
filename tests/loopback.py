"""A loopback HTTP file server for the download tests (the real HTTP stack, no network): serves ``files[path]``,
either bytes or ``(bytes, "cut")`` for a body that announces its full length and sends half, and records every
requested path."""

from __future__ import annotations

import http.server
import threading


class FileServer:
    def __init__(self, files: dict | None = None):
        self.files: dict = {} if files is None else files
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                outer.requests.append(self.path)
                entry = outer.files.get(self.path.lstrip("/"))
                body, mode = entry if isinstance(entry, tuple) else (entry, "ok")
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body if mode == "ok" else body[: len(body) // 2])
                if mode == "cut":
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
