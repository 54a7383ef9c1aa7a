#!/usr/bin/env python3
"""Record tls.pcap + tls.keys: one SIP call over TLS on loopback, with its TLS key log.

Real TLS (Python's ssl module, OpenSSL underneath) between a client and a server on
127.0.0.1, captured by tcpdump; the client writes SSLKEYLOGFILE lines. Run as root from
the repository root: python tests/pcaps/make_tls_pcap.py
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
from tests.builders import SDP, sip_request, sip_response  # noqa: E402

PORT = 5061
CALL = "tls-call@golden"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        key, cert = Path(tmp, "key.pem"), Path(tmp, "cert.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "2", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
        pcap = Path(tmp, "tls.pcap")
        dump = subprocess.Popen(["tcpdump", "-i", "lo", "-s", "0", "-U", "-w", str(pcap), f"tcp port {PORT}"],
                                stderr=subprocess.DEVNULL)
        time.sleep(1)
        srv_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        srv_ctx.load_cert_chain(cert, key)
        listener = socket.create_server(("127.0.0.1", PORT))
        replies = [sip_response(100, "Trying", call_id=CALL, to_tag=None, branch="z9hG4bK-inv"),
                   sip_response(200, "OK", call_id=CALL, body=SDP, branch="z9hG4bK-inv"),
                   sip_response(200, "OK", call_id=CALL, cseq=2, cseq_method="BYE", branch="z9hG4bK-bye")]

        def serve() -> None:
            conn, _ = listener.accept()
            with srv_ctx.wrap_socket(conn, server_side=True) as tls:
                buf = b""
                while buf.count(b"\r\n\r\n") < 1:
                    buf += tls.recv(65535)
                tls.sendall(replies[0])
                time.sleep(0.05)
                tls.sendall(replies[1])
                buf = b""
                while b"BYE " not in buf:
                    buf += tls.recv(65535)
                tls.sendall(replies[2])
                time.sleep(0.1)
            listener.close()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        cli_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        cli_ctx.check_hostname = False
        cli_ctx.verify_mode = ssl.CERT_NONE
        cli_ctx.keylog_filename = str(HERE / "tls.keys")
        with socket.create_connection(("127.0.0.1", PORT)) as raw, cli_ctx.wrap_socket(raw) as tls:
            tls.sendall(sip_request("INVITE", call_id=CALL, branch="z9hG4bK-inv", body=SDP))
            got = b""
            while got.count(b"SIP/2.0 ") < 2:
                got += tls.recv(65535)
            tls.sendall(sip_request("ACK", call_id=CALL, branch="z9hG4bK-ack", to_tag="ttag1"))
            time.sleep(0.05)
            tls.sendall(sip_request("BYE", call_id=CALL, cseq=2, branch="z9hG4bK-bye", to_tag="ttag1"))
            got = b""
            while b"BYE" not in got:
                got += tls.recv(65535)
        t.join(10)
        time.sleep(1)
        dump.terminate()
        dump.wait(10)
        (HERE / "tls.pcap").write_bytes(pcap.read_bytes())
    print("wrote", HERE / "tls.pcap", HERE / "tls.keys")


if __name__ == "__main__":
    main()
