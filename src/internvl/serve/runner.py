"""`internvl serve`: flags -> `ServerConfig` + `MediaPolicy` -> `create_app` -> uvicorn, with the graceful shutdown of
SERVING.md §11.

On the first SIGTERM or SIGINT the server keeps listening but turns unready (`/health` 503 `shutting_down`, new
requests 503 + Retry-After), lets in-flight requests run for up to `--shutdown-timeout` seconds, aborts the rest
(streams end with `finish_reason: "abort"` and `[DONE]`, non-streamed requests get a 503), then stops uvicorn and
exits 0. A second SIGINT exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
from pathlib import Path

from internvl.serve.config import MIB, ServerConfig, read_api_key_file

API_KEY_ENV = "INTERNVL_API_KEY"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _uvicorn_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn.Server whose exit signal first drains the app (`ServerState.drain`), then stops uvicorn."""

        def __init__(self, config, state, shutdown_timeout: float):
            super().__init__(config)
            self.state, self.shutdown_timeout = state, shutdown_timeout
            self._loop = None
            self._draining = False

        async def serve(self, sockets=None):
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame):  # runs in the main thread (signal.signal), between bytecodes
            # not recorded in _captured_signals: uvicorn would re-raise it after serving and exit with -SIGTERM
            if self._loop is None:  # not serving yet
                self.should_exit = True
                return
            if self._draining:  # a second SIGINT exits at once
                if sig == signal.SIGINT:
                    self.force_exit = self.should_exit = True
                return
            self._draining = True
            self.state.begin_drain()
            self._loop.call_soon_threadsafe(self._start_drain)

        def _start_drain(self):
            self._drain_task = asyncio.ensure_future(self._drain_then_exit())

        async def _drain_then_exit(self):
            try:
                await self.state.drain(self.shutdown_timeout)
            finally:
                self.should_exit = True

    return DrainingServer


def run_server(source, config: ServerConfig, log_level: str = "info") -> int:
    import uvicorn

    from internvl.serve.app import create_app

    app = create_app(source, config)
    ucfg = uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level, lifespan="on",
                          timeout_graceful_shutdown=2, access_log=False)
    server = _uvicorn_server_class()(ucfg, app.state.server, config.shutdown_timeout)
    server.run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    d = ServerConfig()
    p = argparse.ArgumentParser(
        prog="internvl serve",
        description="OpenAI-compatible HTTP server (POST /v1/chat/completions, /v1/completions; GET /v1/models, "
        "/health, /live, /metrics) backed by the continuous-batching engine. Contract: SERVING.md.",
    )
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory or hub id (default: the shipped demo model)")
    g = p.add_argument_group("network and auth")
    g.add_argument("--host", default=d.host, help=f"bind address (default {d.host}; a public address without "
                   "--api-key logs a warning)")
    g.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port}; 0 picks a free one)")
    g.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help=f"accepted API key; repeat for several (also --api-key-file, or ${API_KEY_ENV}); "
                   "none: auth off")
    g.add_argument("--api-key-file", metavar="FILE", help="file with one API key per line")
    g.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                   help="CORS origins allowed to call the API (default: CORS off)")
    g.add_argument("--metrics-require-auth", action="store_true", help="guard /metrics with the API keys too")
    g = p.add_argument_group("model and engine")
    g.add_argument("--model-name", default=None, help="served model id (default: the checkpoint directory name; "
                   "'internvl-demo' for the demo model)")
    g.add_argument("--max-batch-size", "--max-num-seqs", dest="max_batch_size", type=int, default=d.max_batch_size,
                   help=f"sequences decoded together (default {d.max_batch_size})")
    g.add_argument("--session-len", type=int, default=None,
                   help="context length in tokens (default: the model's, capped by the KV pool)")
    g.add_argument("--kv-budget-mib", type=int, default=d.kv_budget_bytes // MIB,
                   help=f"KV cache pool size in MiB (default {d.kv_budget_bytes // MIB})")
    g.add_argument("--prefill-chunk-tokens", type=int, default=d.prefill_chunk_tokens)
    g.add_argument("--vit-max-batch-tiles", type=int, default=d.vit_max_batch_tiles)
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU)")
    g = p.add_argument_group("admission and limits")
    g.add_argument("--max-queue", type=int, default=d.max_queue, help=f"waiting requests before 429 (default "
                   f"{d.max_queue})")
    g.add_argument("--queue-timeout", type=float, default=d.queue_timeout,
                   help=f"seconds to wait for the first token before 503 (default {d.queue_timeout:g})")
    g.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                   help=f"seconds in-flight requests get after SIGTERM (default {d.shutdown_timeout:g})")
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    g.add_argument("--limit-images-per-prompt", type=int, default=d.limit_images_per_prompt)
    g.add_argument("--max-dynamic-patch-cap", type=int, default=d.max_dynamic_patch_cap)
    g.add_argument("--max-n", type=int, default=d.max_n)
    g.add_argument("--max-new-tokens-default", type=int, default=d.max_new_tokens_default)
    g.add_argument("--video-num-frames", type=int, default=d.video_num_frames)
    g = p.add_argument_group("media fetching (SSRF-safe by default)")
    g.add_argument("--allowed-local-media-path", metavar="DIR", default=None,
                   help="accept file:// URLs for files inside DIR (default: file:// refused)")
    g.add_argument("--allowed-media-domains", nargs="+", default=None, metavar="HOST",
                   help="fetch http(s) media only from these exact hosts (host or host:port)")
    g.add_argument("--allow-private-media-ips", action="store_true",
                   help="SECURITY: allow media URLs that resolve to private/loopback addresses (tests only)")
    g.add_argument("--max-image-pixels", type=int, default=None, help="pixel cap per image (default 40000000)")
    g.add_argument("--max-media-redirects", type=int, default=None, help="redirects followed (default 3)")
    g.add_argument("--apply-exif-orientation", action="store_true", help="rotate images by their EXIF tag")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def config_from_args(args) -> ServerConfig:
    from internvl.serve.media_policy import MediaPolicy

    keys = list(args.api_key)
    if args.api_key_file:
        keys += read_api_key_file(args.api_key_file)
    if os.environ.get(API_KEY_ENV):
        keys.append(os.environ[API_KEY_ENV])
    media = {}
    if args.allowed_local_media_path is not None:
        media["allowed_local_media_path"] = args.allowed_local_media_path
    if args.allowed_media_domains is not None:
        media["allowed_media_domains"] = tuple(args.allowed_media_domains)
    if args.max_image_pixels is not None:
        media["max_pixels"] = args.max_image_pixels
    if args.max_media_redirects is not None:
        media["max_redirects"] = args.max_media_redirects
    media["allow_private_networks"] = args.allow_private_media_ips
    media["apply_exif_orientation"] = args.apply_exif_orientation
    return ServerConfig(
        host=args.host, port=args.port, model_name=args.model_name, max_batch_size=args.max_batch_size,
        session_len=args.session_len, kv_budget_bytes=args.kv_budget_mib * MIB,
        prefill_chunk_tokens=args.prefill_chunk_tokens, vit_max_batch_tiles=args.vit_max_batch_tiles,
        device=args.device, dtype=args.dtype, max_queue=args.max_queue, queue_timeout=args.queue_timeout,
        shutdown_timeout=args.shutdown_timeout, max_body_bytes=args.max_body_bytes,
        limit_images_per_prompt=args.limit_images_per_prompt, max_dynamic_patch_cap=args.max_dynamic_patch_cap,
        max_n=args.max_n, max_new_tokens_default=args.max_new_tokens_default, video_num_frames=args.video_num_frames,
        api_keys=tuple(keys), metrics_require_auth=args.metrics_require_auth,
        allowed_origins=tuple(args.allowed_origins), media=MediaPolicy(**media),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model is not None and not Path(args.model).exists() and not HUB_ID.fullmatch(args.model):
        raise FileNotFoundError(f"no checkpoint directory at {args.model!r} (and it is not a hub id like 'org/name')")
    config = config_from_args(args)  # ValueError -> one line from the CLI dispatcher
    config.media_policy()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if config.media.allow_private_networks:
        logging.getLogger("internvl.serve").warning(
            "--allow-private-media-ips: media URLs may reach private and loopback addresses (SSRF guard off)")
    return run_server(args.model, config, log_level=args.log_level)
