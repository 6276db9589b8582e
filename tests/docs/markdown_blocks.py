"""Run the code blocks of a Markdown file: how the test suite checks that every snippet of docs/ and README.md works.

    python tests/docs/markdown_blocks.py docs/01-autograd.md                  # one line per block, with its time
    python tests/docs/markdown_blocks.py docs/01-autograd.md --write-images   # also refresh docs/images/

Blocks, by the language after the opening fence:
- `python`: all python blocks of a file run in order, in-process, in ONE namespace (like a notebook), after
  `tinytf.manual_seed(0)` and `np.random.seed(0)`. A failing `assert` (any exception) fails the file; the error
  names the file and the block's first line, and its traceback gives the Markdown's own line numbers.
- `output`: right after a python block (blank lines between them at most), the block's stdout must equal it, up to
  trailing whitespace on each line. Elsewhere (after prose, after a bash block) it is shown, not compared.
- `bash`: each line is a command (`\\` continues a line, `#` starts a comment, `&&` or `;` separate commands):
  - `python -m tinytf.NAME ...`, `python -m pytest ...`, `python FILE.py` (a script of the clone, e.g.
    examples/...), each optionally through `-m mpi4py`, under `mpiexec`/`mpirun` and after `NAME=value` settings,
    run as subprocesses (the repository root on PYTHONPATH) and must exit 0;
  - `pip install ...` is checked, not run: every extra (`.[dev]`, `'tinytf[plot]'`) must be one of pyproject.toml's
    and every package named must be a requirement there (of the project or of an extra);
  - `cd DIR` moves the rest of the block into DIR (which must exist in the run's folder);
  - anything else (an unknown command, a pipe, a redirection) fails, naming the command.
- `text`, `dot` and blocks without a language are listings: never run. Any other language fails.

Where things run: a fresh temporary folder ROOT/repo stands for a clone of the repository: it links the clone's
examples/, bench/, tests/ and pyproject.toml, so commands written for a clone run unchanged, and `..` (ROOT) is the
clone's parent, still inside the temporary folder. Python blocks and commands share it, so a snippet can read what
a command wrote (`runs/...`).

Directives, HTML comments on the lines right before a block (invisible on GitHub), several per comment with `;`:
- `<!-- test: replace "OLD" "NEW" -->`: run the block with every OLD replaced by NEW. OLD must occur in the block,
  so a stale directive fails instead of hiding. Use it to shrink sizes and iterations, never to change what a
  snippet shows.
- `<!-- test: fixture NAME PATH -->`: before the first block runs, make what the block needs at PATH (relative to
  ROOT/repo). The fixtures:
  - `gpt2-folder`: a Hugging Face GPT-2 folder (config.json, model.safetensors, tokenizer.json) of random weights:
    2 layers, width 32, a byte-level BPE of 320 tokens trained on Python's documentation;
  - `text`: the first 65,536 characters of Python's documentation (tinytf.train's default corpus) as a UTF-8 text
    file, standing in for a corpus the test machine need not have (e.g. ../shared/data/tinyshakespeare.txt).
- `<!-- test: expect-error "TEXT" -->`: the block's commands must fail in the one-line way of tinytf's command
  lines (exit status 2) with TEXT in their output, e.g. a GPU check where the test suite has no GPU.
A directive not directly above a block fails, as does an unknown one.

Pictures: a snippet writes `images/NAME` (images/ exists in the run's folder, as beside a chapter). After the run,
every `![...](images/NAME)` the file links (outside code) must have been produced (existing, non-empty, an SVG
parsing as XML with an <svg> root, a PNG with the PNG signature and a positive size) and must be committed beside the
file (FOLDER/images/NAME), so that the repository's web page shows it. `--write-images` copies the pictures the
file links from the run into FOLDER/images/, from where they are committed; it runs the blocks as written, without
their replace directives, so that a picture shows what the text says (the full run, not the test's few steps).
Every other relative link (a picture,
`[text](../tinytf/tensor.py)`, `[text](01-autograd.md#anchor)`) must lead to a file of the repository.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import linecache
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import tinytf
from tinytf.data import default_corpus
from tinytf.interop import save_pretrained
from tinytf.models import GPT, GPTConfig
from tinytf.tokenization import train_bpe

REPO = Path(__file__).resolve().parents[2]
CLONE_LINKS = ("examples", "bench", "tests", "pyproject.toml")  # what a command written for a clone may reach
LISTINGS = {"", "text", "output", "dot"}
RUN = {"python", "bash"}
COMMAND_TIMEOUT = 300  # seconds: a hung command fails instead of hanging the suite
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PIP_FLAGS = {"-e", "--editable", "-U", "--upgrade", "-q", "--quiet", "-v", "--verbose", "--no-deps", "--pre",
             "--user", "--no-cache-dir", "--no-build-isolation"}
EXPECTED_ERROR_STATUS = 2  # tinytf's command lines end every refusal with one line and this status
FIXTURE_TEXT_CHARACTERS = 65536

FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})\s*([^`\s]*)[^`]*$")
DIRECTIVE = re.compile(r"^\s*<!--\s*test:(.*?)-->\s*$")
LINK = re.compile(r"(!?)\[[^\]]*\]\(([^)\s]+)[^)]*\)")  # (image mark, target) of [text](target) and ![alt](target)


class MarkdownError(Exception):
    """A block failed or a file is malformed; the message names the file, the line and what failed."""


@dataclass
class Directive:
    kind: str  # "replace", "fixture" or "expect-error"
    args: tuple[str, ...]


@dataclass
class Block:
    language: str
    line: int  # the opening fence's line (1-based); the code starts on the next one
    code: str
    directives: list[Directive] = field(default_factory=list)
    end_line: int = 0  # the closing fence's line


def parse_blocks(text: str, name: str = "<markdown>") -> list[Block]:
    """The fenced blocks of a Markdown text, with their directives; raises MarkdownError on an unclosed fence, an
    unknown language or a directive that is not directly above a block."""
    lines = text.splitlines()
    blocks, pending, index = [], [], 0
    while index < len(lines):
        line = lines[index]
        match = FENCE.match(line)
        if DIRECTIVE.match(line):
            pending.append((index + 1, DIRECTIVE.match(line).group(1)))
        elif line.lstrip().startswith("<!-- test:"):
            raise MarkdownError(f"{name}:{index + 1}: a test directive must be one whole line: {line.strip()}")
        elif match:
            indent, fence, language = match.groups()
            start, index = index, index + 1
            while index < len(lines) and not re.match(rf"^ {{0,3}}{fence[0]}{{{len(fence)},}}\s*$", lines[index]):
                index += 1
            if index == len(lines):
                raise MarkdownError(f"{name}:{start + 1}: the code block is never closed")
            if language not in LISTINGS | RUN:
                raise MarkdownError(f"{name}:{start + 1}: unknown block language {language!r} (python and bash run; "
                                    f"text, output, dot and none are listings)")
            code = "\n".join(_dedent(body, len(indent)) for body in lines[start + 1:index])
            directives = [directive for at, body in pending for directive in _parse_directives(body, name, at)]
            if directives and language not in RUN:
                raise MarkdownError(f"{name}:{pending[0][0]}: a test directive above a {language or 'plain'} "
                                    f"block, which never runs")
            blocks.append(Block(language, start + 1, code, directives, index + 1))
            pending = []
        elif pending:  # a directive, then a line that is neither a directive nor a block's fence
            raise MarkdownError(f"{name}:{pending[0][0]}: a test directive must sit on the lines right above "
                                f"its block")
        index += 1
    if pending:
        raise MarkdownError(f"{name}:{pending[0][0]}: a test directive after the last block")
    return blocks


def _dedent(line: str, indent: int) -> str:
    return line[min(indent, len(line) - len(line.lstrip(" "))):]


def _parse_directives(body: str, name: str, line: int) -> list[Directive]:
    lexer = shlex.shlex(body, posix=True, punctuation_chars=";")
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError as error:
        raise MarkdownError(f"{name}:{line}: cannot read the test directive ({error})") from None
    directives, words = [], []
    for token in tokens + [";"]:
        if token != ";":
            words.append(token)
            continue
        if not words:
            continue
        kind, args = words[0], tuple(words[1:])
        wanted = {"replace": 2, "fixture": 2, "expect-error": 1}.get(kind)
        if wanted is None:
            raise MarkdownError(f"{name}:{line}: unknown test directive {kind!r} (replace, fixture, expect-error)")
        if len(args) != wanted:
            raise MarkdownError(f"{name}:{line}: `{kind}` takes {wanted} argument(s), got {len(args)}: {body.strip()}")
        if kind == "fixture" and args[0] not in FIXTURES:
            raise MarkdownError(f"{name}:{line}: unknown fixture {args[0]!r} (one of {', '.join(FIXTURES)})")
        directives.append(Directive(kind, args))
        words = []
    return directives


# ---- fixtures: what a fresh test run lacks, made before the first block ----

def make_gpt2_folder(path: Path) -> None:
    tokenizer = train_bpe([default_corpus()[:FIXTURE_TEXT_CHARACTERS]], vocab_size=320)
    config = GPTConfig.from_preset("gpt2", vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2,
                                   n_embd=32)
    save_pretrained(GPT(config), path)
    (path / "tokenizer.json").write_text(tokenizer.to_dict()["tokenizer_json"], encoding="utf-8")


def make_text(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(default_corpus()[:FIXTURE_TEXT_CHARACTERS], encoding="utf-8")


FIXTURES = {"gpt2-folder": make_gpt2_folder, "text": make_text}


# ---- running a file ----

@dataclass
class BlockResult:
    block: Block
    seconds: float


def run_markdown(path, write_images: bool = False, on_block=None) -> list[BlockResult]:
    """Run every block of the Markdown file `path` (see the module docstring); raises MarkdownError on the first
    failure. `on_block(result)` is called after each block; `write_images` runs the blocks as written (no replace
    directives) and copies the linked pictures into the file's images/ folder."""
    path = Path(path).resolve()
    name = _display_name(path)
    text = path.read_text(encoding="utf-8")
    blocks = parse_blocks(text, name)
    results = []
    with tempfile.TemporaryDirectory(prefix="tinytf-markdown-") as root:
        workdir = Path(root) / "repo"
        (workdir / "images").mkdir(parents=True)  # as beside a chapter, where docs/images/ exists
        for entry in CLONE_LINKS:
            (workdir / entry).symlink_to(REPO / entry)
        with _working_directory(workdir), _markdown_source(name, text) as source_lines:
            _seed()  # random fixtures (a model's weights) come out the same in every run
            _make_fixtures(blocks, workdir, name)
            _seed()
            namespace = {"__name__": "__main__"}
            for index, block in enumerate(blocks):
                started = time.perf_counter()
                code = block.code if write_images else _apply_replacements(block, name)
                if block.language == "python":
                    shown = _output_after(blocks, index, text)
                    _run_python(block, code, namespace, name, source_lines, shown)
                elif block.language == "bash":
                    _run_bash(block, code, workdir, name)
                else:
                    continue
                results.append(BlockResult(block, time.perf_counter() - started))
                if on_block is not None:
                    on_block(results[-1])
        _check_links(text, blocks, path, workdir, name, write_images)
    return results


def _display_name(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


@contextlib.contextmanager
def _working_directory(folder: Path):
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def _markdown_source(name: str, text: str):
    """Lets tracebacks show the Markdown's lines (as run, after replacements) under the file's name."""
    lines = [line + "\n" for line in text.splitlines()]
    linecache.cache[name] = (len(text), None, lines, name)  # mtime None: checkcache leaves the entry alone
    try:
        yield lines
    finally:
        linecache.cache.pop(name, None)


def _make_fixtures(blocks: list[Block], workdir: Path, name: str) -> None:
    """Each fixture once (several blocks may name the same one), inside the run's folder."""
    wanted = {(block.line, *directive.args) for block in blocks for directive in block.directives
              if directive.kind == "fixture"}
    made = set()
    for line, fixture, relative in sorted(wanted):
        target = (workdir / relative).resolve()
        if not target.is_relative_to(workdir.parent):
            raise MarkdownError(f"{name}:{line}: fixture path {relative!r} leaves the run's folder")
        if (fixture, target) not in made:
            FIXTURES[fixture](target)
            made.add((fixture, target))


def _seed() -> None:
    tinytf.manual_seed(0)
    np.random.seed(0)


def _apply_replacements(block: Block, name: str) -> str:
    code = block.code
    for directive in block.directives:
        if directive.kind != "replace":
            continue
        old, new = directive.args
        if old not in code:
            raise MarkdownError(f"{name}:{block.line}: stale directive: replace {old!r} does not occur in the block")
        if "\n" in new:
            raise MarkdownError(f"{name}:{block.line}: a replacement must not add lines (the line numbers must hold)")
        code = code.replace(old, new)
    return code


def _output_after(blocks: list[Block], index: int, text: str) -> str | None:
    """The text of the output block right after block `index` (only blank lines between them), else None."""
    if index + 1 == len(blocks) or blocks[index + 1].language != "output":
        return None
    between = text.splitlines()[blocks[index].end_line:blocks[index + 1].line - 1]
    return blocks[index + 1].code if all(not line.strip() for line in between) else None


def _run_python(block: Block, code: str, namespace: dict, name: str, source_lines: list[str],
                shown: str | None) -> None:
    first = block.line  # the code's first line is the line after the fence, index `first` in source_lines
    code_lines = code.splitlines()
    source_lines[first:first + len(code_lines)] = [line + "\n" for line in code_lines]
    compiled = compile("\n" * first + code + "\n", name, "exec")
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            exec(compiled, namespace)
    except (Exception, SystemExit) as error:  # a snippet's sys.exit() fails it too
        frames = traceback.format_exception(type(error), error, error.__traceback__.tb_next)
        printed = f"\nits output before the error:\n{stdout.getvalue()}" if stdout.getvalue() else ""
        raise MarkdownError(f"{name}:{block.line}: python block failed:\n{''.join(frames)}{printed}") from None
    if shown is not None and _lines(stdout.getvalue()) != _lines(shown):
        raise MarkdownError(f"{name}:{block.line}: the block's output differs from the output block after it:\n"
                            f"--- printed ---\n{stdout.getvalue()}--- shown ---\n{shown}")


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _run_bash(block: Block, code: str, workdir: Path, name: str) -> None:
    expected = next((directive.args[0] for directive in block.directives if directive.kind == "expect-error"), None)
    cwd = workdir
    for command in bash_commands(code, f"{name}:{block.line}"):
        settings, argv = _split_settings(command)
        where = f"{name}:{block.line}: `{shlex.join(command)}`"
        if argv[:2] == ["pip", "install"] or argv[:4] == ["python", "-m", "pip", "install"]:
            check_pip_install(argv[argv.index("install") + 1:], where)
        elif argv[0] == "cd":
            cwd = _change_directory(argv, cwd, workdir, where)
        else:
            _run_command(_runnable(argv, cwd, where), settings, cwd, where, expected)


def bash_commands(code: str, where: str) -> list[list[str]]:
    """The commands of a bash block, each as a list of words (continuations joined, comments stripped)."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError as error:
            raise MarkdownError(f"{where}: cannot read the shell line {line!r} ({error})") from None
        words = []
        for token in tokens + ["&&"]:
            if token in ("&&", ";"):
                if words:
                    commands.append(words)
                words = []
            elif set(token) <= set("|&;<>()"):
                raise MarkdownError(f"{where}: shell syntax {token!r} is not supported by the collector: {line}")
            else:
                words.append(token)
    return commands


def _split_settings(command: list[str]) -> tuple[dict, list[str]]:
    settings = {}
    while command and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", command[0]):
        key, value = command[0].split("=", 1)
        settings[key] = value
        command = command[1:]
    return settings, command


def _change_directory(argv: list[str], cwd: Path, workdir: Path, where: str) -> Path:
    target = (cwd / argv[1]).resolve() if len(argv) == 2 else None
    if target is None or not target.is_dir() or not target.is_relative_to(workdir.parent):
        raise MarkdownError(f"{where}: cd takes one folder that exists in the run's folder")
    return target


def _runnable(argv: list[str], cwd: Path, where: str) -> list[str]:
    """argv with `python` as this interpreter, when it is a command the collector runs; else MarkdownError."""
    launcher = []
    if argv[0] in ("mpiexec", "mpirun"):
        if "python" not in argv:
            raise MarkdownError(f"{where}: {argv[0]} must launch `python ...`")
        start = argv.index("python")
        launcher, argv = [shutil.which(argv[0]) or argv[0]] + argv[1:start], argv[start:]
    arguments = argv[1:]
    if arguments[:2] == ["-m", "mpi4py"]:  # mpi4py's runner aborts every rank when one raises
        arguments = arguments[2:]
    module = arguments[1] if arguments[:1] == ["-m"] and len(arguments) > 1 else ""
    script = bool(arguments) and arguments[0].endswith(".py") and (cwd / arguments[0]).is_file()
    if argv[0] != "python" or not (script or module == "pytest" or module.startswith("tinytf.")):
        raise MarkdownError(f"{where}: unknown command (the collector runs python -m tinytf.*, python -m pytest, "
                            f"python FILE.py, under mpiexec or not; checks pip install; and follows cd)")
    return launcher + [sys.executable] + argv[1:]


def _run_command(argv: list[str], settings: dict, cwd: Path, where: str, expected: str | None) -> None:
    env = {**os.environ, **settings}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), settings.get("PYTHONPATH", ""),
                                                      os.environ.get("PYTHONPATH", "")]))
    try:
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise MarkdownError(f"{where}: still running after {COMMAND_TIMEOUT} s") from None
    output = done.stdout + done.stderr
    if expected is None and done.returncode != 0:
        raise MarkdownError(f"{where}: exit status {done.returncode}:\n{output[-4000:]}")
    if expected is not None and (done.returncode != EXPECTED_ERROR_STATUS or expected not in output):
        raise MarkdownError(f"{where}: expected exit status {EXPECTED_ERROR_STATUS} and {expected!r} in the output, "
                            f"got status {done.returncode}:\n{output[-4000:]}")


def check_pip_install(args: list[str], where: str, pyproject: Path = REPO / "pyproject.toml") -> None:
    """Every extra named must be one of pyproject's, every package a requirement of the project or an extra."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    extras = project.get("optional-dependencies", {})
    known = {_package_name(requirement) for requirement in project.get("dependencies", [])}
    known |= {_package_name(requirement) for group in extras.values() for requirement in group}
    if not args:
        raise MarkdownError(f"{where}: pip install of nothing")
    for arg in args:
        if arg.startswith("-"):
            if arg not in PIP_FLAGS:
                raise MarkdownError(f"{where}: pip option {arg} is not one the collector knows")
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[([^\]]*)\])?\s*([<>=!~].*)?", arg)
        if match is None:
            raise MarkdownError(f"{where}: cannot read the pip requirement {arg!r}")
        package, named_extras = match.group(1), match.group(2)
        is_project = package == "." or _normalize(package) == _normalize(project["name"])
        if not is_project and _normalize(package) not in known:
            raise MarkdownError(f"{where}: {package} is not a requirement in pyproject.toml")
        if named_extras is not None and not is_project:
            raise MarkdownError(f"{where}: the extras of {package} are not checked: name tinytf's extras instead")
        for extra in filter(None, (item.strip() for item in (named_extras or "").split(","))):
            if extra not in extras:
                raise MarkdownError(f"{where}: pyproject.toml has no extra {extra!r} (it has {', '.join(extras)})")


def _package_name(requirement: str) -> str:
    return _normalize(re.match(r"[A-Za-z0-9_.-]+", requirement).group(0))


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _check_links(text: str, blocks: list[Block], path: Path, workdir: Path, name: str, write_images: bool) -> None:
    """Relative links must reach a file of the repository; linked pictures under images/ must be produced."""
    for image, target in dict.fromkeys(LINK.findall(_prose(text, blocks))):
        link = target.split("#", 1)[0]
        if not link or re.match(r"[a-z]+:", link) or link.startswith("/"):
            continue  # an anchor in the page, or a page on the web
        if not (image and link.startswith("images/")):
            if not (path.parent / link).exists():
                raise MarkdownError(f"{name}: the link {target} leads nowhere (no {link} beside the file)")
            continue
        produced = workdir / link
        problem = image_problem(produced)
        if problem:
            raise MarkdownError(f"{name}: the linked image {link} was not produced by the file's blocks: {problem}")
        committed = path.parent / link
        if write_images:
            committed.parent.mkdir(exist_ok=True)
            shutil.copyfile(produced, committed)
        if not committed.is_file():
            raise MarkdownError(f"{name}: {link} is produced but not in the repository beside the file; run "
                                f"python tests/docs/markdown_blocks.py {name} --write-images")


def _prose(text: str, blocks: list[Block]) -> str:
    """The text outside code blocks and inline code spans: where a link is a link."""
    lines = text.splitlines()
    for block in blocks:
        lines[block.line - 1:block.end_line] = [""] * (block.end_line - block.line + 1)
    return re.sub(r"`[^`]*`", "", "\n".join(lines))


def image_problem(path: Path) -> str | None:
    """What is wrong with the picture file `path` (missing, empty, not of its suffix's format), None if nothing."""
    if not path.is_file():
        return "missing"
    data = path.read_bytes()
    if not data:
        return "empty"
    if path.suffix == ".svg":
        try:
            root = ElementTree.fromstring(data)
        except ElementTree.ParseError as error:
            return f"not XML ({error})"
        return None if root.tag.rsplit("}", 1)[-1] == "svg" else f"the XML root is <{root.tag}>, not <svg>"
    if path.suffix == ".png":
        if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
            return "not a PNG"
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return None if width > 0 and height > 0 else f"a PNG of size {width} x {height}"
    return f"pictures are .svg or .png, not {path.suffix}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run the code blocks of a Markdown file as the test suite does.")
    parser.add_argument("file", type=Path, help="the Markdown file")
    parser.add_argument("--write-images", action="store_true",
                        help="run the blocks as written (no replace directives) and copy the pictures the file "
                             "links into its folder's images/ (to commit them)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TINYTF_CUDA_STANDIN", "1")  # as the test suite without a GPU; =0 on a machine with one

    def report(result: BlockResult) -> None:
        block = result.block
        print(f"{block.line:5d}  {block.language:6s}  {result.seconds:7.2f} s", flush=True)

    started = time.perf_counter()
    try:
        results = run_markdown(args.file, args.write_images, report)
    except MarkdownError as error:
        print(f"FAILED {error}", file=sys.stderr)
        return 1
    print(f"{args.file}: {len(results)} blocks ran in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
