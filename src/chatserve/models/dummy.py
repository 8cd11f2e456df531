"""The built-in dummy model's tokenizer, and a writer for tiny random HF model dirs.

The tokenizer is a small byte-level BPE (the GPT-2/Qwen scheme) trained in-process on an
embedded corpus, so tests and benchmarks need no downloads. Its vocabulary is small on
purpose: many Chinese characters and emoji end up split over several tokens, which is
what exercises incremental detokenization of multi-byte characters.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # transformers is slow to import; only load it when a function needs it
    from transformers import PreTrainedTokenizerFast

DUMMY_MODEL_NAME = "dummy_model"

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START = "<think>"
THINK_END = "</think>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# Qwen3 marks <think>/</think> as added but *not* special: they survive skip_special_tokens.
NON_SPECIAL_ADDED_TOKENS = (THINK_START, THINK_END)

# BPE vocabulary before the 5 added tokens, so len(tokenizer) == 1000. The corpus is just big
# enough for training to reach it (a test checks), so keep it when editing the corpus.
_BPE_VOCAB_SIZE = 995

# Qwen2's pre-tokenization split (like GPT-2's, but digits are split one by one).
_QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ChatML, with tools as Qwen2.5 writes them (Hermes style): the tool list in the system turn, calls
# as <tool_call>{"name": ..., "arguments": {...}}</tool_call>, results as <tool_response> in a user
# turn. Without tools or tool messages it renders plain ChatML.
CHATML_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{- '<|im_start|>assistant\\n' + (message['content'] or '') }}"
    "{%- for call in message['tool_calls'] %}"
    "{{- '<tool_call>\\n{\\\"name\\\": \\\"' + call['function']['name'] + '\\\", \\\"arguments\\\": ' "
    "+ (call['function']['arguments'] | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_CORPUS = """\
Hello! How can I help you today?
Hi there. I'm doing well, thank you for asking. How are you?
Could you explain how a transformer language model works?
Sure. A transformer reads a sequence of tokens and predicts the next token, one step at a time.
Each layer has an attention block and a feed-forward block, with residual connections around both.
The attention block lets every position look at the earlier positions in the sequence.
What is the capital of France? The capital of France is Paris.
Please write a short poem about the sea and the stars.
The waves are singing softly, the stars are burning bright, and the sea keeps all its secrets through the night.
Thanks, that was lovely! Can you summarize it in one sentence?
The poem describes a quiet night by the sea under a sky full of stars.
I think the answer is 42, but let me check the numbers again: 6 * 7 = 42.
The meeting is at 3:30 pm on Tuesday, March 14th, in room 204.
Let's think step by step. First, we read the question carefully. Then we answer it.
You are a helpful assistant. Answer the user's questions clearly and briefly.
Sorry, I don't know the answer to that question.
The quick brown fox jumps over the lazy dog.
It's a beautiful day, isn't it? Yes, the weather is great for a walk in the park.
Can you recommend a good book for learning programming? I would start with a simple language like Python.
What time is it in Tokyo right now? I cannot check the current time, but Tokyo is nine hours ahead of UTC.
Please translate this sentence into French: "Where is the train station?" Answer: "Où est la gare ?"
How do I make a cup of tea? Boil water, pour it over the tea leaves, wait three minutes, and enjoy.
Tell me a joke. Why did the programmer quit his job? Because he didn't get arrays.
The server returned an error: connection refused. Check that the service is running and the port is open.
Streaming responses send each new piece of text to the client as soon as it is generated.
The model generates text token by token, and the server streams every token back to the user.
If the request is cancelled, the server stops generating and frees the memory used by the cache.
Temperature controls randomness: a lower temperature makes the output more focused and predictable.
Top-p sampling keeps the smallest set of tokens whose probabilities add up to p.
I'm not sure what you mean. Could you give me a little more detail about the problem?
Of course! Here is a list of three ideas: go hiking, visit a museum, or cook a new recipe at home.
Remember to drink water, take short breaks, and get enough sleep every night.
The user asked a question, and the assistant answered with a short, friendly and correct reply.
What is the difference between a list and a tuple in Python? A list can be changed after it is created, while a tuple cannot.
Explain recursion to a five year old. Recursion is when a function calls itself to solve a smaller version of the same problem.
Write an email to my team about the meeting next week. Subject: Meeting next week. Hi team, our weekly meeting will be on Monday at ten.
Good morning! Did you sleep well? Good morning, I slept very well, thank you. What should we do first today?
The history of computers began with simple machines that could only add numbers; today they answer questions and write stories.
A good answer is short, clear and honest. When you do not know something, say so and suggest where to look.
Summarize the following paragraph in two sentences, and then list the main points as bullet points.
Please check my code for bugs. The function returns None when the input list is empty, so handle that case first.
Which planet is the largest in our solar system? Jupiter is the largest planet, and it has dozens of moons.
How many days are there in a leap year? A leap year has three hundred and sixty-six days.
Can you help me plan a trip to Italy? Start in Rome, take the train to Florence, and finish in Venice.
My computer is very slow. What can I do? Close programs you are not using, restart it, and check for updates.
Describe your favorite season. I like autumn best, because the air is cool and the leaves turn red and gold.
Thank you so much for your patience. You're welcome! Have a wonderful evening and good luck with your project.
Is it going to rain tomorrow? I can't see the forecast, but you can check a weather website before you leave.
What does this error mean: "index out of range"? It means the code tried to read a position that does not exist.
Please answer with yes or no only. Yes.
We should leave early tomorrow morning, before the traffic gets heavy.
The train leaves at seven forty-five, so we should get to the station early.
Where did you put the keys? I left them on the kitchen table next to the window.
你好！今天我能帮你做什么？
我很好，谢谢你的关心。你今天过得怎么样？
请用中文简单介绍一下机器学习。
机器学习是人工智能的一个分支，它让计算机从数据中学习规律。
语言模型根据前面的文字预测下一个词。
北京是中国的首都，上海是中国最大的城市之一。
今天天气很好，我们一起去公园散步吧。
这个问题很有意思，让我想一想再回答你。
谢谢你的帮助！不客气，有问题随时问我。
我喜欢读书、听音乐和写代码。
春天来了，花都开了，小鸟在树上唱歌。
学而时习之，不亦说乎？有朋自远方来，不亦乐乎？
人工智能正在改变我们的生活和工作方式。
请问附近有没有好吃的餐厅？前面路口左转就有一家很不错的饭馆。
我们明天早上八点在学校门口见面，不要迟到。
这本书讲的是一个年轻人离开家乡，去大城市追求梦想的故事。
如果你有任何问题，请随时告诉我，我会尽力帮助你。
こんにちは、元気ですか？ 안녕하세요! Привет, как дела? Hola, ¿qué tal? Ça va très bien, merci.
Great job! 🎉 I love it ❤️ 😀 😂 👍 🚀 🌟 🔥 ✅ 🤖 🙏 👋 🍕 🐍
That's funny 😂😂 and this is amazing 🚀🚀 see you later 👋
Family: 👨‍👩‍👧‍👦 flags: 🇨🇳 🇺🇸 🇫🇷 skin tones: 👍🏽 👋🏻
# Markdown heading
## Installation

Run `pip install chatserve` and then start the server:

```bash
chatserve serve --model dummy_model --port 8000
```

- **Bold item** and *italic item*
- [a link](https://example.com/docs?page=1&lang=en)
1. First step
2. Second step

| name | value |
|------|-------|
| temperature | 0.7 |
| top_p | 0.8 |

```python
def fibonacci(n: int) -> list[int]:
    \"\"\"Return the first n Fibonacci numbers.\"\"\"
    result = [0, 1]
    while len(result) < n:
        result.append(result[-1] + result[-2])
    return result[:n]


class Greeter:
    def __init__(self, name):
        self.name = name

    def greet(self):
        print(f"Hello, {self.name}!")
        return {"status": "ok", "count": 3}
```

```json
{"role": "user", "content": "hello", "stream": true, "max_tokens": 128}
```

for (int i = 0; i < 10; i++) { sum += i; }

```javascript
const response = await fetch("/v1/chat/completions", { method: "POST", body: JSON.stringify(request) });
for await (const chunk of response.body) { console.log(new TextDecoder().decode(chunk)); }
```

```python
import asyncio

async def main() -> None:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for token in ["Hello", ",", " world", "!"]:
        await queue.put(token)
    while not queue.empty():
        print(await queue.get(), end="", flush=True)

if __name__ == "__main__":
    asyncio.run(main())
```
"""


@functools.lru_cache(maxsize=1)
def _dummy_tokenizer_json() -> str:
    """Train the BPE once per process; return it serialized so callers get fresh copies."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    # Exactly the pipeline transformers' Qwen2Tokenizer rebuilds around a tokenizer.json, so
    # AutoTokenizer gives identical ids whichever tokenizer class it picks for a model dir.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        min_frequency=2,  # merge only repeated pairs, so rare CJK chars/emoji stay split
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    # Added after training so they get the top ids, as in Qwen's vocab.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NON_SPECIAL_ADDED_TOKENS])
    return tok.to_str()


def build_dummy_tokenizer() -> PreTrainedTokenizerFast:
    """Return a new dummy tokenizer (training is cached; each call gets its own object)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_dummy_tokenizer_json()),
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START],
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


# arch -> (transformers model class, config class, rope_theta as in the real checkpoints)
_ARCHS = {
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", 1_000_000.0),  # q/k/v projections have bias
    "llama": ("LlamaForCausalLM", "LlamaConfig", 500_000.0),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", 1_000_000.0),  # per-head q/k RMSNorm
}
TINY_ARCHS = tuple(_ARCHS)

# Llama 3.1-style frequency scaling, shrunk to fit the tiny 512-position model.
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def write_hf_model_dir(
    path: str | Path,
    arch: str,
    *,
    tie_word_embeddings: bool = False,
    sharded: bool = False,
    rope_scaling: dict[str, Any] | None = None,
    seed: int = 0,
    hub_style_config: bool = True,
    vocab_size: int | None = None,
) -> Path:
    """Write a tiny random fp32 model dir laid out like a hub download; return its path.

    Weights come from transformers' own model classes, so they double as the reference
    implementation. hub_style_config=True rewrites config.json into the form most hub
    checkpoints have (top-level ``rope_theta``, ``rope_scaling``, ``torch_dtype``);
    False keeps transformers 5's own form (``rope_parameters``, ``dtype``). vocab_size pads the
    embedding and output rows past the tokenizer's tokens, as many hub checkpoints (Qwen2.5) do.
    """
    import torch
    import transformers
    from transformers import GenerationConfig

    if arch not in _ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {TINY_ARCHS}")
    model_cls_name, config_cls_name, rope_theta = _ARCHS[arch]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tokenizer = build_dummy_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    eot_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    # transformers 5 keeps rope_theta and any scaling together in rope_parameters.
    rope_parameters = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta}

    config = getattr(transformers, config_cls_name)(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_parameters=rope_parameters,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=eot_id,
        eos_token_id=eos_id,
        pad_token_id=eot_id,
    )
    config.architectures = [model_cls_name]

    torch.manual_seed(seed)
    model = getattr(transformers, model_cls_name)(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # RMSNorm weights init to ones; randomize so they matter
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):  # q/k/v biases init to zero
                p.normal_(0.0, 0.5)
            else:
                # Larger than the usual 0.02 so attention scores are O(1): with near-uniform
                # attention, RoPE or masking bugs would barely change the logits.
                p.normal_(0.0, 0.15)

    model.generation_config = GenerationConfig(
        bos_token_id=eot_id,
        eos_token_id=[eos_id, eot_id],
        pad_token_id=eot_id,
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
    )
    model.save_pretrained(path, max_shard_size="200KB" if sharded else "50GB")
    tokenizer.save_pretrained(path)

    if hub_style_config:
        cfg_path = path / "config.json"
        cfg = json.loads(cfg_path.read_text())
        rope = dict(cfg.pop("rope_parameters"))
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
        cfg["torch_dtype"] = cfg.pop("dtype", "float32")
        cfg_path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")
    return path
