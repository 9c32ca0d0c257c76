"""SGLangServer (a running SGLang server over its HTTP API) against a fake server in a
thread that answers as SGLang's http_server does: /generate on a batch, the weight calls'
{"success", "message"} with HTTP 400 on a failure, /get_server_info's flat server args."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from brorl.engine import SamplingParams
from brorl.engine.backends.sglang import SGLangEngine
from brorl.engine.backends.sglang_http import SGLangServer


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _answer(self, code: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 - http.server's name
        self.server.requests.append(("GET", self.path, None, self.headers.get("Authorization")))
        if self.path == "/get_server_info":
            self._answer(200, {"tp_size": 2, "pp_size": 1, "dp_size": 1, "version": "0.5"})
        else:
            self._answer(404, {"detail": "Not Found"})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(("POST", self.path, body, self.headers.get("Authorization")))
        if self.path == "/generate":
            out = [{"text": f"r{r}", "meta_info": {
                "finish_reason": {"type": "length", "length": sp["max_new_tokens"]},
                "output_token_logprobs": [[-0.25, 100 * r + k, None]
                                          for k in range(sp["max_new_tokens"])]}}
                   for r, sp in enumerate(body["sampling_params"])]
            self._answer(200, out)
        elif self.path == "/init_weights_update_group":
            self._answer(400, {"success": False, "message": "Failed to initialize custom "
                                                            "process group: refused."})
        elif self.path == "/update_weights_from_distributed":
            self._answer(200, {"success": True, "message": "Succeeded to update parameter "
                                                           "online."})
        else:
            self._answer(500, "Internal Server Error")


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _url(httpd) -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}"


def test_generate_through_the_server_gives_our_outputs(qwen2, server):
    eng = SGLangEngine(qwen2[0], engine=SGLangServer(_url(server), api_key="k"))
    outs = eng.generate([[5, 6, 7], [8]], SamplingParams(n=2, max_tokens=3, logprobs=True))
    assert [[c.token_ids for c in o.outputs] for o in outs] == [
        [[0, 1, 2], [100, 101, 102]], [[200, 201, 202], [300, 301, 302]]]
    assert outs[0].outputs[0].logprobs == [-0.25] * 3
    assert outs[1].outputs[1].finish_reason == "length"
    method, path, body, auth = server.requests[-1]
    assert (method, path, auth) == ("POST", "/generate", "Bearer k")
    assert body["input_ids"] == [[5, 6, 7]] * 2 + [[8]] * 2
    assert body["return_logprob"] is True and body["logprob_start_len"] == -1


def test_server_args_give_the_sync_ranks(qwen2, server):
    eng = SGLangEngine(qwen2[0], engine=SGLangServer(_url(server)))
    assert eng.num_sync_ranks() == 2
    assert [r[1] for r in server.requests].count("/get_server_info") == 1
    eng.num_sync_ranks()
    assert [r[1] for r in server.requests].count("/get_server_info") == 1  # read once


def test_a_weight_call_failing_with_400_raises_sglangs_message(qwen2, server):
    eng = SGLangEngine(qwen2[0], engine=SGLangServer(_url(server)))
    with pytest.raises(ValueError, match="init_weights_update_group failed: Failed to "
                                         "initialize custom process group: refused"):
        eng.init_weight_sync("127.0.0.1", 29500, 1, 3, group_name="g")
    body = server.requests[-1][2]
    assert body == {"master_address": "127.0.0.1", "master_port": 29500, "rank_offset": 1,
                    "world_size": 3, "group_name": "g", "backend": "nccl"}


def test_an_unreachable_server_and_a_bad_url_are_clear_errors(qwen2):
    with pytest.raises(ValueError, match="must start with http"):
        SGLangServer("localhost:30000")
    from brorl.trainer.weight_sync.channel import free_port

    eng = SGLangEngine(qwen2[0], engine=SGLangServer(f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(RuntimeError, match="cannot be reached"):
        eng.generate([[1]], SamplingParams(max_tokens=1))
    with pytest.raises(NotImplementedError, match="SGLangSender"):
        eng.update_weights({})
