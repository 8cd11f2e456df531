"""The one entry point: `chatserve serve | chat | client | generate`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from dataclasses import fields
from typing import Optional, Sequence

from .config import CHARS_PER_TOKEN, DEFAULT_MODEL, EngineConfig, ServerConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    g = parser.add_argument_group("model and engine")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="a local Hugging Face model directory, a .gguf file (llama.cpp/Ollama), a hub id "
                        "(org/name, or org/name/file.gguf for one GGUF of a repo; downloaded into the HF cache), "
                        f"or '{DEFAULT_MODEL}', the built-in random model that needs no download (default)")
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) to download")
    g.add_argument("--dtype", default=d.dtype, choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights and activations; auto = bfloat16 on CUDA and on CPUs with native bf16 "
                        "(avx512_bf16/AMX), else float32")
    g.add_argument("--quantization", default=None, choices=["int8", "int4", "none"],
                   help="weight-only quantization at load, on the CPU: int8 (per output channel) or int4 "
                        "(groups of 32) for every Linear layer, the output head and the embedding (int8). "
                        "Default: as the checkpoint stores them (safetensors at --dtype; a GGUF's Q4_0/Q4_1 "
                        "blocks run as int4 as they are, Q8_0/Q6_K as int8); none = dequantize a GGUF to --dtype")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N (auto picks CUDA when present)")
    g.add_argument("--load-format", default=d.load_format, choices=["auto", "dummy"],
                   help="dummy = random weights on the model's real config (benchmarks without weights)")
    g.add_argument("--kv-cache-memory-gib", type=float, default=d.kv_cache_memory_gib,
                   help="memory for the paged KV cache pool, GiB (default %(default)s)")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks (overrides the memory budget)")
    g.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV block (default %(default)s)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs,
                   help="most requests batched in one step (default %(default)s)")
    g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="per-step token budget; longer prompts prefill in chunks (default %(default)s)")
    g.add_argument("--no-prefix-caching", action="store_true", help="turn automatic prefix caching off")
    g.add_argument("--num-threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    g.add_argument("--native-kernels", default=d.native_kernels, choices=["auto", "on", "off"],
                   help="chatserve's C++ decode kernels for the CPU (fused norms, SiLU and paged attention; "
                        "about 2x faster decode on small models), compiled once with the machine's C++ compiler "
                        "and cached in ~/.cache/chatserve/kernels. auto = use them when cached, else build them "
                        "in the background while decode runs on PyTorch ops (default); on = build before "
                        "serving and fail if that is impossible; off = PyTorch ops only")
    g.add_argument("--engine-seed", dest="seed", type=int, default=d.seed,
                   help="seed of the engine's generator for unseeded requests (default %(default)s)")
    g.add_argument("--override-generation-config", type=generation_overrides, default={}, metavar="JSON",
                   help="sampling defaults over the model's generation_config, for every request (and every "
                        "route) that leaves a value unset, e.g. '{\"temperature\": 0.7, \"top_p\": 0.8}'; keys: "
                        "temperature, top_p, top_k, min_p, repetition_penalty (default: the model's "
                        "generation_config, else temperature 1, top_p 1)")


def generation_overrides(text: str) -> dict:
    """--override-generation-config: a JSON object of sampling defaults, checked before anything loads."""
    from .engine.sampling import check_sampling_defaults

    try:
        return check_sampling_defaults(json.loads(text))
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): give an object such as "
                                         '\'{"temperature": 0.7, "top_p": 0.8}\'') from None
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def sampling_value(name: str, kind: type):
    """An argparse type for the sampling flag of SamplingParams' field `name`: the value checked by
    the engine's own rules when the command line is parsed, before any model loads."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        from .engine.sampling import SamplingParams

        try:
            SamplingParams(**{name: value})
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    return parse


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    names = {f.name for f in fields(EngineConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return EngineConfig(enable_prefix_caching=not args.no_prefix_caching, **values)


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling", "unset values come from --override-generation-config, else the "
                                              "model's generation_config, else temperature 1, top_p 1")
    g.add_argument("--max-tokens", type=sampling_value("max_tokens", int), default=256,
                   help="most tokens to generate (default %(default)s)")
    g.add_argument("--temperature", type=sampling_value("temperature", float), default=None,
                   help="0 = greedy; in [0, 2]")
    g.add_argument("--top-p", type=sampling_value("top_p", float), default=None,
                   help="nucleus sampling: sample among the most likely tokens whose probabilities add up to "
                        "top_p; in (0, 1]")
    g.add_argument("--top-k", type=sampling_value("top_k", int), default=None,
                   help="sample among the k most likely tokens; 0 or -1 = off")
    g.add_argument("--min-p", type=sampling_value("min_p", float), default=None,
                   help="drop tokens below min_p x the top probability; in [0, 1]")
    g.add_argument("--repetition-penalty", type=sampling_value("repetition_penalty", float), default=None,
                   help="divide the scores of tokens already in the prompt or the answer by this (> 1 repeats "
                        "less, 1 = off); in (0, 2]")
    g.add_argument("--seed", dest="sampling_seed", type=int, default=None, help="seed for this generation")
    g.add_argument("--stop", action="append", default=[], type=sampling_value("stop", str),
                   help="a stop string (repeatable)")


def sampling_params_from_args(args: argparse.Namespace, defaults: dict):
    from .engine.sampling import SamplingParams

    values = {"max_tokens": args.max_tokens, "seed": args.sampling_seed, "stop": args.stop}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        value = getattr(args, name)
        if value is None:
            value = defaults.get(name)
        if value is not None:
            values[name] = value
    return SamplingParams(**values)


def cmd_generate(args: argparse.Namespace) -> int:
    from .engine.engine import Engine
    from .models.loader import ModelLoadError

    try:
        engine = Engine(engine_config_from_args(args))
        gen_defaults = engine.generation_config
        params = sampling_params_from_args(args, gen_defaults)
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        if args.raw:
            prompt = args.prompt
        else:
            prompt = {"prompt_token_ids": engine.apply_chat_template(messages + [{"role": "user", "content": args.prompt}])}
        request_id = engine.add_request(prompt, params)
    except ModelLoadError as exc:
        print(f"error: could not load model {args.model}: {exc}", file=sys.stderr)  # as `serve` says it
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start = time.monotonic()
    final = None
    try:
        while engine.has_unfinished():
            for out in engine.step():
                if out.request_id == request_id:
                    sys.stdout.write(out.text)
                    sys.stdout.flush()
                    final = out if out.finished else final
    except KeyboardInterrupt:
        engine.abort_request(request_id)
        print("\n[stopped]", file=sys.stderr)
        return 130
    elapsed = time.monotonic() - start
    sys.stdout.write("\n")
    if final is not None:
        ttft = final.time_to_first_token or 0.0
        print(f"[{final.num_output_tokens} tokens, {final.num_output_tokens / max(elapsed, 1e-9):.1f} tokens/s, "
              f"first token {ttft * 1000:.0f} ms, finish: {final.finish_reason}]", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .server.app import create_app
    from .server.connection import http_protocol

    host = f"[{args.host}]" if ":" in args.host else args.host
    server_config = ServerConfig(host=args.host, port=args.port, api_key=args.api_key or None,
                                 api_key_file=args.api_key_file or None,
                                 cors_origins=args.cors_origin, allowed_hosts=args.allowed_host,
                                 max_queue=args.max_queue,
                                 max_body_bytes=args.max_body_bytes, header_timeout=args.header_timeout,
                                 body_timeout=args.body_timeout, shutdown_timeout=args.shutdown_timeout,
                                 model_aliases=args.model_alias, db_path=args.db_path or None,
                                 served_model_name=args.served_model_name,
                                 trust_request_chat_template=args.trust_request_chat_template,
                                 url=f"http://{host}:{args.port}",
                                 max_prompt_chars=args.max_prompt_chars, template_timeout=args.template_timeout,
                                 template_workers=args.template_workers)
    load_errors: list[str] = []

    def load_failed(message: str) -> None:
        # A server whose model will never load serves nothing: stop, and say why, as generate does.
        load_errors.append(message)
        server.should_exit = True

    try:
        app = create_app(engine_config_from_args(args), server_config, on_load_error=load_failed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # log_config=None: uvicorn's lines ("Uvicorn running on http://...") go through our logging format.
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           log_config=None, http=http_protocol(server_config.header_timeout),
                                           timeout_graceful_shutdown=server_config.shutdown_timeout))
    # Once uvicorn has shut down after SIGTERM or Ctrl-C it raises the signal again; the stop was
    # graceful by then, so exit 0 rather than die by the signal or a KeyboardInterrupt traceback.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_quietly)
    server.run()
    if load_errors:
        print(f"error: {load_errors[0]}", file=sys.stderr)
        return 2
    return 0 if server.started else 3  # 3: it never listened (e.g. the port is taken), as uvicorn.run exits


def _exit_quietly(signum, frame) -> None:
    raise SystemExit(0)


def cmd_client(args: argparse.Namespace) -> int:
    from .client.infer import run

    if args.log_level != "debug":
        logging.getLogger("httpx").setLevel(logging.WARNING)  # its per-request line is noise in the demo
    return run(args.url, model=args.model, api_key=args.api_key or None, text_only=args.text,
               max_tokens=args.max_tokens)


def cmd_chat(args: argparse.Namespace) -> int:
    from .client.chat import run_chat

    if args.log_level != "debug":
        logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would break up the chat
    if args.db is not None and args.model is None:
        print("error: --db applies only with --model (a running server keeps its own store)", file=sys.stderr)
        return 2
    engine_config = engine_config_from_args(args) if args.model else None
    return run_chat(args.url, api_key=args.api_key or None, engine_config=engine_config, db_path=args.db,
                    new=args.new)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatserve",
        description="A streaming chat service for local LLMs. `chatserve serve` serves a model on "
                    "http://127.0.0.1:8000: the web chat at /, the OpenAI API at /v1 (chat/completions, "
                    "completions, models) for any OpenAI client, stored conversations at /v1/conversations, the "
                    "original demo's NDJSON protocol at /infer, /health and /metrics. `chatserve chat` chats in the "
                    "terminal, `chatserve client` replays the original demo, `chatserve generate` answers once "
                    "without a server. `chatserve COMMAND --help` explains each.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="how much to log on stderr (default %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = sub.add_parser("generate", parents=[common], help="answer one chat message, streamed to the terminal",
                         description="Load a model in-process and stream its answer to one message.")
    gen.add_argument("prompt", nargs="?", default="Hello, how are you?", help="the user message (default: %(default)r)")
    gen.add_argument("--system", default=None, help="a system prompt")
    gen.add_argument("--raw", action="store_true", help="send the text as a plain prompt, without the chat template")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", parents=[common],
                           help="serve a model over HTTP: the web chat at /, the OpenAI API at /v1, /infer",
                           description="Load a model and serve it over HTTP (http://127.0.0.1:8000 by default): "
                                       "the web chat at /; the OpenAI API at /v1 (POST /v1/chat/completions, POST "
                                       "/v1/completions, GET /v1/models; point any OpenAI client at "
                                       "http://HOST:PORT/v1); stored conversations at /v1/conversations (API docs "
                                       "at /docs); the original demo's POST /infer, streaming NDJSON. GET /health "
                                       "is 200 once the model is loaded (503 while it loads or shuts down), GET "
                                       "/metrics gives Prometheus metrics (both need no API key). A model that "
                                       "cannot be loaded stops the server with exit status 2. SIGTERM or Ctrl-C "
                                       "ends every stream with a final chunk and exits.")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on; 0.0.0.0 for every interface (default %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default %(default)s)")
    serve.add_argument("--api-key", default=os.environ.get("CHATSERVE_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on generating routes; /health and /metrics stay "
                            "open. KEY is the key of the user named 'default', who also owns conversations stored "
                            "before there were users (default: $CHATSERVE_API_KEY, else none)")
    serve.add_argument("--api-key-file", default=os.environ.get("CHATSERVE_API_KEY_FILE"), metavar="PATH",
                       help="users and their keys, one 'USER KEY' pair a line ('#' comments and blank lines "
                            "allowed; a user may have several keys, a key only one user): requests need one of "
                            "these keys (or --api-key's), and each user sees only the conversations their keys "
                            "created; another's is a 404. A malformed file or a repeated key stops the start "
                            "(default: $CHATSERVE_API_KEY_FILE, else none)")
    serve.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="a browser origin allowed to call the API, e.g. http://localhost:3000 (repeatable)")
    serve.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="a name clients may reach the server by, in the Host header (repeatable; '*' for any). "
                            "Loopback names, --host and the IP address a request arrived at are always accepted; other "
                            "names get 400, so a web page cannot rebind its DNS name to this server")
    serve.add_argument("--max-queue", type=int, default=ServerConfig.max_queue,
                       help="most generations in flight (running or waiting), counted per engine request: a chat "
                            "completion with n takes n, a completion prompts x n; a request that does not fit "
                            "gets 429 with Retry-After at once, one that asks for more than this (or 128) alone "
                            "a 400 (default %(default)s)")
    serve.add_argument("--max-body-bytes", type=int, default=ServerConfig.max_body_bytes, metavar="BYTES",
                       help="largest request body accepted; larger gets 413 (default %(default)s = 4 MiB)")
    serve.add_argument("--header-timeout", type=float, default=ServerConfig.header_timeout, metavar="SECONDS",
                       help="close a connection whose request headers have not all arrived this long after it "
                            "opened or after its previous response (default %(default)s)")
    serve.add_argument("--body-timeout", type=float, default=ServerConfig.body_timeout, metavar="SECONDS",
                       help="answer 408 and close the connection when a request body has not all arrived this "
                            "long after its headers; responses, however long they stream, are not bounded "
                            "(default %(default)s)")
    serve.add_argument("--shutdown-timeout", type=int, default=ServerConfig.shutdown_timeout, metavar="SECONDS",
                       help="after SIGTERM or Ctrl-C, wait at most this long for open connections before "
                            "exiting; streams end at once (default %(default)s)")
    serve.add_argument("--served-model-name", metavar="NAME",
                       help="the model's name in /v1/models and in responses (default: the hub id, or a local "
                            "folder's or .gguf file's own name rather than its full path)")
    serve.add_argument("--model-alias", action="append", default=[], metavar="NAME",
                       help="another name requests may give as 'model' (repeatable); the served model's own "
                            "name (the --model value) is always accepted")
    serve.add_argument("--db", dest="db_path", default=os.environ.get("CHATSERVE_DB"), metavar="PATH",
                       help="SQLite file of the stored conversations (/v1/conversations), created if missing; "
                            "':memory:' keeps nothing (default: $CHATSERVE_DB, else "
                            "$XDG_DATA_HOME/chatserve/conversations.sqlite3, i.e. ~/.local/share/chatserve/...)")
    serve.add_argument("--trust-request-chat-template", action="store_true",
                       help="accept a chat template sent by a request (chat_template_kwargs.chat_template); off by "
                            "default: a client's Jinja would run on this machine (in a worker process, bounded by "
                            "--template-timeout)")
    serve.add_argument("--max-prompt-chars", type=int, default=None, metavar="CHARS",
                       help="most characters of text one request may bring (its messages or prompts together); "
                            "more gets 400 before anything is tokenized (default: "
                            f"{CHARS_PER_TOKEN} per token of the model's context length)")
    serve.add_argument("--template-timeout", type=float, default=ServerConfig.template_timeout, metavar="SECONDS",
                       help="chat templates render in worker processes; one that takes longer is killed and its "
                            "request gets 400 (default %(default)s)")
    serve.add_argument("--template-workers", type=int, default=ServerConfig.template_workers, metavar="N",
                       help="chat template renders running at once, each in its own worker process; more wait "
                            "their turn (default %(default)s)")
    add_engine_args(serve)
    serve.set_defaults(func=cmd_serve)

    client = sub.add_parser("client", parents=[common], help="stream the demo chat from a server's /infer",
                            description="Post the original demo's chat to /infer and print each streamed line "
                                        "(raw bytes and parsed), as the original stream_test.py does.")
    client.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default %(default)s)")
    client.add_argument("--text", action="store_true", help="print only the streamed text")
    client.add_argument("--model", default=None,
                        help="the model name to ask for (default: the one the server serves, from its /v1/models; "
                             f"'{DEFAULT_MODEL}' from a server without that route, such as the original demo's)")
    client.add_argument("--api-key", default=os.environ.get("CHATSERVE_API_KEY"),
                        help="the server's API key, sent as 'Authorization: Bearer KEY' (default: $CHATSERVE_API_KEY)")
    client.add_argument("--max-tokens", type=int, default=None, help="most tokens to generate (default: until a stop token or the context is full)")
    client.set_defaults(func=cmd_client)

    # conflict_handler="resolve": chat's own --model (optional: without it, connect to --url)
    # replaces the engine group's, whose default is a model.
    chat = sub.add_parser("chat", conflict_handler="resolve", formatter_class=argparse.RawDescriptionHelpFormatter,
                          help="chat in the terminal, with stored conversations",
                          description="Chat in the terminal with a running server (`chatserve serve`), or with "
                                      "--model, with a model loaded in-process. Answers stream as they are "
                                      "generated; conversations are stored on the server, branches included; the "
                                      "most recently updated one is resumed.",
                          epilog="Enter sends a message. End a line with \\ to continue on the next one, or put "
                                 '""" on a line\nto start a block and again to end it. Ctrl-C stops an answer; '
                                 "Ctrl-C or Ctrl-D at the prompt exits.\nIn a terminal: the up arrow recalls a "
                                 "whole message, Tab completes a /command, answers show as Markdown.\n\n"
                                 "Commands: /new /list /switch /rename /delete /history /edit /regen /continue "
                                 "/branch /system /params /help /quit\n(/help in the chat explains each).")
    chat.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                      help="how much to log on stderr (default %(default)s: the chat stays readable)")
    where = chat.add_argument_group("server")
    where.add_argument("--url", default="http://127.0.0.1:8000",
                       help="the chatserve server to talk to (default %(default)s)")
    where.add_argument("--api-key", default=os.environ.get("CHATSERVE_API_KEY"),
                       help="the server's API key, sent as 'Authorization: Bearer KEY' (default: $CHATSERVE_API_KEY)")
    add_engine_args(chat)
    where.add_argument("--model", default=None,
                       help="instead of --url, load this model in-process and serve it on a free loopback port: "
                            f"a local Hugging Face model directory, a hub id, or '{DEFAULT_MODEL}' (random, no "
                            "download); the 'model and engine' flags apply to it")
    where.add_argument("--db", default=None, metavar="PATH",
                       help="with --model: the SQLite file for its conversations (default: the same as `chatserve "
                            "serve`, $XDG_DATA_HOME/chatserve/conversations.sqlite3; ':memory:' keeps nothing)")
    where.add_argument("--new", action="store_true",
                       help="start a new conversation instead of resuming the most recently updated one")
    chat.set_defaults(func=cmd_chat)
    for command_parser in sub.choices.values():
        command_parser.set_defaults(command_parser=command_parser)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """parse_args, except that an unknown flag is reported with its command's usage (`serve --prot`
    shows serve's flags), not the top level's."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(build_parser(), argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
