"""A running SGLang server (`python -m sglang.launch_server`) behind the methods of
`sglang.Engine` that `SGLangEngine` calls, over SGLang's HTTP API with the standard library
(no SGLang install needed on the trainer's side):

    engine = SGLangEngine(model_dir, engine=SGLangServer("http://10.0.0.5:30000"))

POST /generate, /init_weights_update_group, /update_weights_from_distributed and
/destroy_weights_update_group, and GET /get_server_info (for `server_args`: the tensor-,
pipeline- and data-parallel sizes). The weight calls answer {"success", "message"}, also
with HTTP 400 on a failure; that answer is returned, so SGLangEngine raises SGLang's
message. In-process tensors cannot travel over HTTP: `update_weights_from_tensor` refuses.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from types import SimpleNamespace


class SGLangServer:
    """`url`: the server's base URL. `timeout_s`: per request (None: wait as long as the
    server takes; a generate of 512 samples, or a weight update that waits for the running
    requests, can take minutes). `api_key`: sent as a bearer token when the server has one."""

    def __init__(self, url: str, timeout_s: float | None = None,
                 api_key: str | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"SGLang server URL must start with http:// or https://, got "
                             f"{url!r}")
        self.url, self.timeout_s, self.api_key = url.rstrip("/"), timeout_s, api_key
        self._server_args = None

    @property
    def server_args(self) -> SimpleNamespace:
        """The server's arguments (tp_size, pp_size, dp_size, ...), read once."""
        if self._server_args is None:
            try:
                info = self._request("GET", "/get_server_info")
            except RuntimeError:  # versions before get_server_info
                info = self._request("GET", "/get_server_args")
            self._server_args = SimpleNamespace(**{k: v for k, v in info.items()
                                                   if isinstance(k, str)})
        return self._server_args

    def generate(self, input_ids, sampling_params, return_logprob: bool = False,
                 logprob_start_len: int | None = None) -> list[dict]:
        """One result dict per request, in order (SGLang's /generate on a batch)."""
        body = {"input_ids": input_ids, "sampling_params": sampling_params,
                "return_logprob": return_logprob}
        if logprob_start_len is not None:
            body["logprob_start_len"] = logprob_start_len
        out = self._request("POST", "/generate", body)
        return out if isinstance(out, list) else [out]

    def init_weights_update_group(self, **kwargs) -> dict:
        return self._weight_call("/init_weights_update_group", kwargs)

    def update_weights_from_distributed(self, **kwargs) -> dict:
        return self._weight_call("/update_weights_from_distributed", kwargs)

    def destroy_weights_update_group(self, **kwargs) -> dict:
        return self._weight_call("/destroy_weights_update_group", kwargs)

    def update_weights_from_tensor(self, **kwargs):
        raise NotImplementedError("a SGLang server cannot take in-process tensors: sync by "
                                  "broadcast (brorl.trainer.weight_sync.sglang.SGLangSender)")

    def _weight_call(self, path: str, body: dict) -> dict:
        try:
            return self._request("POST", path, body)
        except _HTTPAnswer as answer:  # SGLang answers a failure with 400 and its message
            if isinstance(answer.body, dict) and "success" in answer.body:
                return answer.body
            raise RuntimeError(str(answer)) from None

    def _request(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read().decode() or "null")
        except urllib.error.HTTPError as err:
            text = err.read().decode(errors="replace")
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                parsed = text
            raise _HTTPAnswer(f"SGLang server {method} {path}: HTTP {err.code}: "
                              f"{text[:500]}", parsed) from None
        except urllib.error.URLError as err:
            raise RuntimeError(f"SGLang server at {self.url} cannot be reached "
                               f"({method} {path}): {err.reason}") from None


class _HTTPAnswer(RuntimeError):
    """An HTTP error status with the server's (parsed) body."""

    def __init__(self, text: str, body) -> None:
        super().__init__(text)
        self.body = body
