"""A misbehaving DICOMweb server on 127.0.0.1, for the answers a real Orthanc never gives.

It serves one study's QIDO-RS JSON and WADO-RS multipart the way a broken PACS or proxy does:
a cut connection mid-transfer, a non-DICOM part, a 404 for one series, an error status, a
server that stalls. It is a real HTTP server on a real socket (nothing is patched in the client).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BOUNDARY = "resdx-test-boundary"


class BadPacs:
    """`mode` per series UID: ok | truncated | not_dicom | html_part | missing_one | 404 | 500 | 401 | slow |
    no_star (406 Not Acceptable for transfer-syntax=*, the default syntax otherwise)."""

    def __init__(self, study_uid: str, series: dict[str, list[bytes]], modality: str = "CT"):
        self.study_uid, self.series, self.modality = study_uid, series, modality
        self.mode: dict[str, str] = {}
        self.requests: list[tuple[str, str, str]] = []  # (path, Authorization header, Accept header)
        self.wado_requests = 0
        handler = self._handler()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/dicom-web"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @staticmethod
    def sop_uid(data: bytes) -> str:
        from pydicom import dcmread
        from pydicom.filebase import DicomBytesIO

        return str(dcmread(DicomBytesIO(data), stop_before_pixels=True).SOPInstanceUID)

    def _handler(self):
        pacs = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: bytes = b"", ctype: str = "application/dicom+json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802 - the http.server API
                path, _, query = self.path.partition("?")
                if "offset=" in query and "offset=0" not in query:  # QIDO paging: one page holds everything
                    return self._send(200, b"[]")
                pacs.requests.append((path, self.headers.get("Authorization", ""), self.headers.get("Accept", "")))
                parts = path.removeprefix("/dicom-web/").strip("/").split("/")
                if parts[:2] != ["studies", pacs.study_uid]:
                    return self._send(200, b"[]") if parts[-1] == "series" else self._send(404)
                if parts[2:] == ["series"]:
                    items = [{"0020000E": {"vr": "UI", "Value": [uid]}, "00080060": {"vr": "CS",
                              "Value": [pacs.modality]}} for uid in pacs.series]
                    return self._send(200, json.dumps(items).encode())
                uid = parts[3] if len(parts) > 3 else ""
                mode = pacs.mode.get(uid, "ok")
                if mode in ("404", "500", "401"):
                    return self._send(int(mode), b"{}")
                if mode == "slow":
                    time.sleep(5)
                if parts[4:] == ["instances"]:
                    items = [{"00080018": {"vr": "UI", "Value": [pacs.sop_uid(d)]}} for d in pacs.series[uid]]
                    return self._send(200, json.dumps(items).encode())
                if len(parts) == 4:
                    pacs.wado_requests += 1
                    if mode == "no_star" and "transfer-syntax=*" in self.headers.get("Accept", ""):
                        return self._send(406, b"{}")
                    return self._wado(pacs.series[uid], mode)
                return self._send(404)

            def _wado(self, files: list[bytes], mode: str) -> None:
                if mode == "missing_one":
                    files = files[:-1]
                chunks = []
                for i, data in enumerate(files):
                    ctype, body = "application/dicom", data
                    if i == 1 and mode == "not_dicom":
                        body = b"\0" * 128 + b"NOPE" + b"x" * 64
                    if i == 1 and mode == "html_part":
                        ctype, body = "text/html", b"<html>proxy error</html>"
                    chunks.append(f"--{BOUNDARY}\r\nContent-Type: {ctype}\r\n\r\n".encode() + body + b"\r\n")
                body = b"".join(chunks) + f"--{BOUNDARY}--\r\n".encode()
                if mode == "truncated":
                    body = body[: len(body) * 2 // 3]
                self.send_response(200)
                self.send_header("Content-Type", f'multipart/related; type="application/dicom"; boundary={BOUNDARY}')
                self.end_headers()  # no Content-Length: the connection's close ends the body, as when cut
                self.wfile.write(body)
                self.close_connection = True

        return Handler


def series_bytes(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()]
