"""`python -m gpuconv mutants`: mutation testing of kernels/*.cu against the emulated kernel tests.

The tests' strength as a number: every mutant is a small, plausible slip planted in a copy of one
kernel source; the chosen test selection runs on it in a subprocess (GPUCONV_KERNEL_DIR points the
runtime at the mutated copy, so the real files are never touched). A mutant the tests fail on is
killed; one they pass on survives and is listed with its diff, unless the reviewed list of
equivalent mutants (EQUIVALENTS_FILE) explains why no test can tell it from the original.

Mutants come from operators over the source text (a small C tokenizer, no line numbers), so the
tool runs unchanged on rewritten kernels:

  comparison       a comparison negated (< to >=, == to !=, ...) or && / || swapped
  bound            a bound made strict / non-strict (< to <=, >= to >, ...)
  constant         an integer literal +1 and -1 (#define'd sizes included)
  bound-shift      the bound of a comparison moved by one, the way `bound` does not already (on
                   integers i < n + 1 is i <= n): i < n to i < n - 1, i <= n to i <= n + 1
  index-swap       an index variable replaced by its other-axis twin in the same function
                   (h/w, x/y: kh to kw, stride_h to stride_w, threadIdx.x to threadIdx.y, tx to ty);
                   not pointers or arrays (data, not indices) and not the all-capital sizes (H, W, KH,
                   OW, ...): every test shape is already non-square, so swapping those would only
                   pad the count
  sync-drop        a __syncthreads() removed
  guard-drop       an `if` or `?:` guard removed, whole or one &&/|| operand at a time
  float-in-double  the template type T replaced by float (a float temporary or cast in the double
                   instance), and a double math function replaced by its float twin (pow to powf)
  race             a store into memory turned into a read-modify-write `+=`, and a per-thread store
                   into shared memory sent to element 0 by every thread (`buffer[0] += v`)

Not generated: T(<integer literal>) to float (small integers are exact in float: equivalent by
construction) and T* to float* (a double pointer into a float* does not compile: no slip anyone makes).

The tests run on each mutant with a per-mutant timeout (a mutant that hangs is killed by the timeout,
counted apart) and a total --budget. A mutant the emulator's g++ cannot build, and every survivor, is
then compiled with NVRTC (gpuconv.cuda.tools.offline, one architecture, as the runtime would; skipped
when CuPy is not installed or with --no-nvrtc): one that NVRTC rejects is killed by the compiler and
counted apart. (A mutant the tests kill is not compiled with NVRTC: it is killed either way, and that
saves CuPy's import and a compile per mutant.)
"""
import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ...cli import HelpFormatter
from ...errors import ArgumentError

OPERATORS = ("comparison", "bound", "constant", "bound-shift", "index-swap", "sync-drop", "guard-drop",
             "float-in-double", "race")

ROOT = Path(__file__).resolve().parents[3]
EQUIVALENTS_FILE = Path(__file__).resolve().parent / "equivalent_mutants.toml"
# Fast, deterministic: the fixed-shape emulated tests (the hypothesis tests are marked slow and stay
# out: a random test that kills a mutant in one run and not in the next gives no number).
# Cheapest first: pytest -x stops at the first failure, so most mutants never reach the slow ones.
# test_gpu_step_emulated.py (about 20 s) is the one that runs optim.cu and elementwise.cu (the fused
# optimizer, the bias + ReLU epilogues), besides the saved max-pool indices and the two-pass gradients.
DEFAULT_TESTS = ("tests/test_gpu_step_emulated.py", "tests/test_kernel_killers.py", "tests/test_filter_gradient_emulated.py",
                 "tests/test_conv_tiles_emulated.py",
                 "tests/test_emulated_kernels.py",
                 "tests/test_conv_flags_emulated.py", "tests/test_kernel_bounds.py")
PYTEST_OPTIONS = ("-x", "-q", "-m", "not slow", "-p", "no:cacheprovider", "--no-header", "-rf")
SOURCE_SUFFIXES = (".cu", ".cuh")
NVRTC_ARCH = "80"
COMPILE_ERROR_EXIT = 86  # the worker's exit status when NVRTC rejects the mutant

STATUSES = ("killed", "killed-by-compiler", "killed-by-timeout", "survived", "equivalent", "not-run")


# ----------------------------------------------------------------------------------------------
# tokens and structure


_TOKEN = re.compile(r"""
   (?P<space>\s+|\\\n)
  |(?P<number>0[xX][0-9a-fA-F]+[uUlL]*|(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?[fFlL]?|\d+[eE][+-]?\d+[fFlL]?|\d+[uUlL]*)
  |(?P<ident>[A-Za-z_]\w*)
  |(?P<string>"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*')
  |(?P<op>::|<<=|>>=|->|\+\+|--|<<|>>|<=|>=|==|!=|&&|\|\||[-+*/%&|^!<>=]=?|[~?:(){}\[\];,.#])
""", re.X)


@dataclasses.dataclass
class Token:
    kind: str
    text: str
    start: int
    end: int
    index: int = 0
    region: int = -1        # index into Source.regions; -1: not mutable (signatures, directives' heads)
    template: bool = False  # a < or > of a template argument list


@dataclasses.dataclass
class Region:
    """A function body (with its signature, for name lookups) or a #define: mutants stay inside one."""
    name: str
    first: int  # token range [first, last) that names may come from
    last: int
    names: set = dataclasses.field(default_factory=set)


def blank_comments(text):
    """Comments replaced by spaces, newlines kept, so offsets and line numbers hold."""
    from ..emulate import _blank_comments
    return _blank_comments(text)


def tokenize(text):
    tokens, position = [], 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match:
            raise ArgumentError(f"mutants: cannot tokenize the source at offset {position}: "
                                f"{text[position:position + 20]!r}")
        if match.lastgroup != "space":
            tokens.append(Token(match.lastgroup, match.group(0), match.start(), match.end(), len(tokens)))
        position = match.end()
    return tokens


class Source:
    """One kernel source: tokens (comments blanked), regions, template brackets, shared arrays."""

    def __init__(self, name, text):
        self.name, self.text = name, text
        self.tokens = tokenize(blank_comments(text))
        self.regions = []
        self._mark_regions()
        self._mark_templates()
        self.shared_arrays = self._shared_arrays()
        self.local_arrays = self._local_arrays()
        self.arrays = self._pointers_and_arrays()

    def line_of(self, offset):
        return self.text.count("\n", 0, offset) + 1

    def _mark_regions(self):
        tokens, text = self.tokens, self.text
        i, depth, statement_start = 0, 0, 0
        while i < len(tokens):
            token = tokens[i]
            line_start = text.rfind("\n", 0, token.start) + 1
            if token.text == "#" and not text[line_start:token.start].strip():
                i = self._mark_directive(i)
                statement_start = i
                continue
            if token.text == "{":
                if depth == 0:
                    body_start = i
                depth += 1
            elif token.text == "}":
                depth -= 1
                if depth == 0:
                    name = self._function_name(statement_start, body_start)
                    region = Region(name, statement_start, i + 1)
                    self.regions.append(region)
                    for t in tokens[body_start + 1:i]:
                        t.region = len(self.regions) - 1
                    region.names = {t.text for t in tokens[statement_start:i + 1] if t.kind == "ident"}
                    statement_start = i + 1
            elif token.text == ";" and depth == 0:
                statement_start = i + 1
            i += 1

    def _mark_directive(self, i):
        """A preprocessor line: the body of a #define is mutable (its own region); returns the index
        of the first token after the directive."""
        tokens, text = self.tokens, self.text
        end = i
        line_end = self._directive_end(tokens[i].start)
        while end < len(tokens) and tokens[end].start < line_end:
            end += 1
        if i + 2 < end and tokens[i + 1].text == "define":
            body = i + 3
            # function-like macro: NAME( directly after the name, parameters are not the body
            if body < end and tokens[body].text == "(" and tokens[body].start == tokens[i + 2].end:
                while body < end and tokens[body].text != ")":
                    body += 1
                body += 1
            region = Region("#define " + tokens[i + 2].text, i, end,
                            {t.text for t in tokens[i:end] if t.kind == "ident"})
            self.regions.append(region)
            for t in tokens[body:end]:
                t.region = len(self.regions) - 1
        return end

    def _directive_end(self, offset):
        text = self.text
        while True:
            newline = text.find("\n", offset)
            if newline < 0:
                return len(text)
            if text[newline - 1] != "\\":
                return newline
            offset = newline + 1

    def _function_name(self, first, body):
        paren = next((j for j in range(first, body) if self.tokens[j].text == "("), None)
        if paren is None:
            return "?"
        j = paren - 1
        if j >= first and self.tokens[j].text == ">":  # name<args>(...) of an explicit specialisation
            while j >= first and self.tokens[j].text != "<":
                j -= 1
            j -= 1
        return self.tokens[j].text if j >= first and self.tokens[j].kind == "ident" else "?"

    def _mark_templates(self):
        tokens = self.tokens
        for i, token in enumerate(tokens):
            if token.text != "<" or i == 0 or tokens[i - 1].kind != "ident":
                continue
            j = i + 1
            while j < len(tokens) and j - i <= 8 and (tokens[j].kind == "ident" or tokens[j].text in (",", "*", "&", "::")):
                j += 1
            if j < len(tokens) and tokens[j].text == ">":
                token.template = tokens[j].template = True

    def _declared_arrays(self, shared):
        names = set()
        tokens = self.tokens
        for i, token in enumerate(tokens[1:-1], 1):
            if token.kind != "ident" or tokens[i + 1].text != "[" or tokens[i - 1].kind != "ident":
                continue
            j = i - 1
            while j >= 0 and tokens[j].text not in (";", "{", "}"):
                j -= 1
            statement = {t.text for t in tokens[j + 1:i]}
            if ("__shared__" in statement) == shared and tokens[i - 1].text not in ("return",):
                names.add(token.text)
        return names

    def _pointers_and_arrays(self):
        """Names ever subscripted or declared as pointers: data, not indices (index-swap leaves them)."""
        names = set()
        tokens = self.tokens
        for i, token in enumerate(tokens[:-1]):
            if token.kind != "ident":
                continue
            if tokens[i + 1].text == "[":
                names.add(token.text)
            j = i - 1
            while j >= 0 and tokens[j].text in ("__restrict__", "const"):
                j -= 1
            if j >= 0 and tokens[j].text == "*" and j > 0 and tokens[j - 1].kind == "ident" and tokens[j - 1].text in {
                    "T", "float", "double", "int", "char", "void", "const"}:
                names.add(token.text)
        return names

    def _shared_arrays(self):
        return self._declared_arrays(shared=True)

    def _local_arrays(self):
        return self._declared_arrays(shared=False)

    def matching(self, i, open_text, close_text, step=1):
        depth = 0
        j = i
        while 0 <= j < len(self.tokens):
            text = self.tokens[j].text
            if text == open_text:
                depth += 1
            elif text == close_text:
                depth -= 1
                if depth == 0:
                    return j
            j += step
        raise ArgumentError(f"mutants: {self.name}: unbalanced {open_text}{close_text} at line "
                            f"{self.line_of(self.tokens[i].start)}")


# ----------------------------------------------------------------------------------------------
# mutants


@dataclasses.dataclass
class Mutant:
    id: str
    source: str
    line: int
    function: str
    operator: str
    start: int
    end: int
    replacement: str
    before: str
    after: str

    def apply(self, text):
        return text[:self.start] + self.replacement + text[self.end:]

    def diff(self):
        return f"{self.source}:{self.line}\n- {self.before}\n+ {self.after}"

    def summary(self):
        return {"id": self.id, "source": self.source, "line": self.line, "function": self.function,
                "operator": self.operator, "before": self.before, "after": self.after}


_NEGATION = {"<": ">=", "<=": ">", ">": "<=", ">=": "<", "==": "!=", "!=": "=="}
_STRICTNESS = {"<": "<=", "<=": "<", ">": ">=", ">=": ">"}
_AXIS_TWINS = {"h": "w", "w": "h", "H": "W", "W": "H", "x": "y", "y": "x", "X": "Y", "Y": "X"}
_FLOAT_TWINS = {"pow": "powf", "sqrt": "sqrtf", "exp": "expf", "log": "logf", "fabs": "fabsf", "rsqrt": "rsqrtf",
                "fmax": "fmaxf", "fmin": "fminf", "floor": "floorf", "ceil": "ceilf", "tanh": "tanhf"}
_ASSIGNMENTS = ("=", "+=", "-=", "*=", "/=")


def _int_literal(text):
    match = re.fullmatch(r"(0[xX][0-9a-fA-F]+|\d+)([uUlL]*)", text)
    if not match:
        return None
    digits, suffix = match.groups()
    return (int(digits, 16), suffix, len(digits) - 2) if digits[:2].lower() == "0x" else (int(digits), suffix, None)


def _format_int(value, suffix, hex_width):
    if hex_width is not None and value >= 0:
        return f"0x{value:0{hex_width}x}{suffix}"
    return f"{value}{suffix}" if value >= 0 else f"({value}{suffix})"


class _Generator:
    def __init__(self, source):
        self.source = source
        self.tokens = source.tokens
        self.edits = []  # (operator, start, end, replacement, token index)

    def add(self, operator, start, end, replacement, index):
        self.edits.append((operator, start, end, replacement, index))

    def mutable(self, token):
        return token.region >= 0

    def run(self):
        for token in self.tokens:
            if not self.mutable(token):
                continue
            if token.kind == "op" and not token.template:
                self.operators(token)
            elif token.kind == "number":
                self.constant(token)
            elif token.kind == "ident":
                self.identifier(token)
        return self.edits

    # comparison, bound, bound-shift, && / ||
    def operators(self, token):
        text = token.text
        if text in _NEGATION:
            self.add("comparison", token.start, token.end, _NEGATION[text], token.index)
        if text in ("&&", "||"):
            self.add("comparison", token.start, token.end, "||" if text == "&&" else "&&", token.index)
        if text in _STRICTNESS:
            self.add("bound", token.start, token.end, _STRICTNESS[text], token.index)
            end = self.operand_end(token.index + 1)
            if end is not None:
                operand = self.tokens[token.index + 1:end]
                if not (len(operand) == 1 and operand[0].kind == "number"):  # covered by `constant`
                    # On integers the other direction repeats `bound` (i < n + 1 is i <= n): only
                    # the shift that makes a new mutant.
                    at = self.tokens[end - 1].end
                    self.add("bound-shift", at, at, " - 1" if text in ("<", ">=") else " + 1", token.index)
        if text in ("=", "+=") and token.index > 0 and self.tokens[token.index - 1].text == "]":
            self.race(token)

    def primary_end(self, i):
        """Index after the primary expression starting at token i (None if there is none)."""
        tokens = self.tokens
        if i >= len(tokens):
            return None
        if tokens[i].text in ("-", "!", "+"):
            return self.primary_end(i + 1)
        if tokens[i].text == "(":
            i = self.source.matching(i, "(", ")") + 1
        elif tokens[i].kind in ("ident", "number"):
            i += 1
        else:
            return None
        while i < len(tokens):
            if tokens[i].text == "." and i + 1 < len(tokens) and tokens[i + 1].kind == "ident":
                i += 2
            elif tokens[i].text == "(":
                i = self.source.matching(i, "(", ")") + 1
            elif tokens[i].text == "[":
                i = self.source.matching(i, "[", "]") + 1
            else:
                break
        return i

    def operand_end(self, i):
        """Index after the multiplicative expression starting at i: where `+ 1` still adds to it."""
        end = self.primary_end(i)
        while end is not None and end < len(self.tokens) and self.tokens[end].text in ("*", "/", "%"):
            end = self.primary_end(end + 1)
        return end

    # constant
    def constant(self, token):
        literal = _int_literal(token.text)
        if literal is None:
            return
        value, suffix, hex_width = literal
        for delta in (1, -1):
            self.add("constant", token.start, token.end, _format_int(value + delta, suffix, hex_width), token.index)

    # index-swap, sync-drop, guard-drop, float-in-double
    def identifier(self, token):
        tokens, i = self.tokens, token.index
        region = self.source.regions[token.region]
        text = token.text
        member = i > 0 and tokens[i - 1].text == "."
        if member:
            if text in ("x", "y"):
                self.add("index-swap", token.start, token.end, _AXIS_TWINS[text], i)
        elif text not in self.source.arrays and not text.isupper():
            for position, ch in enumerate(text):
                if ch in _AXIS_TWINS:
                    twin = text[:position] + _AXIS_TWINS[ch] + text[position + 1:]
                    if twin in region.names and twin not in self.source.arrays:
                        self.add("index-swap", token.start, token.end, twin, i)
        if text == "__syncthreads" and i + 3 < len(tokens) and [t.text for t in tokens[i + 1:i + 4]] == ["(", ")", ";"]:
            self.add("sync-drop", token.start, tokens[i + 3].end, ";  /* __syncthreads() dropped */", i)
        if text == "if" and i + 1 < len(tokens) and tokens[i + 1].text == "(":
            self.guard(i + 1, self.source.matching(i + 1, "(", ")"), skip=self.skips(i))
        if text == "T" and not tokens[i - 1].template and not (i + 1 < len(tokens) and tokens[i + 1].template):
            exact_cast = (tokens[i + 1].text == "(" and tokens[i + 2].kind == "number"
                          and _int_literal(tokens[i + 2].text) is not None and tokens[i + 3].text == ")")
            if not exact_cast and tokens[i + 1].text != "*":
                self.add("float-in-double", token.start, token.end, "float", i)
        if text in _FLOAT_TWINS and i + 1 < len(tokens) and tokens[i + 1].text == "(" and not member:
            self.add("float-in-double", token.start, token.end, _FLOAT_TWINS[text], i)

    def skips(self, i):
        """Whether the `if` at token i guards a `continue`/`return`/`break` (a skip: dropping the
        guard means never skipping) rather than guarding work (dropping it means always working)."""
        close = self.source.matching(i + 1, "(", ")")
        j = close + 1
        if j < len(self.tokens) and self.tokens[j].text == "{":
            j += 1
        return j < len(self.tokens) and self.tokens[j].text in ("continue", "return", "break")

    def guard(self, open_index, close_index, skip):
        tokens = self.tokens
        whole = "false" if skip else "true"
        self.add("guard-drop", tokens[open_index + 1].start, tokens[close_index - 1].end, whole, open_index)
        # one operand of a top-level && / || chain at a time
        operands, depth, begin, joiner = [], 0, open_index + 1, None
        for j in range(open_index + 1, close_index):
            text = tokens[j].text
            depth += text in ("(", "[")
            depth -= text in (")", "]")
            if depth == 0 and text in ("&&", "||"):
                operands.append((begin, j))
                joiner = joiner or text
                begin = j + 1
        operands.append((begin, close_index))
        if len(operands) > 1 and joiner:
            neutral = "true" if joiner == "&&" else "false"
            for first, last in operands:
                self.add("guard-drop", tokens[first].start, tokens[last - 1].end, neutral, first)

    def ternaries(self):
        tokens = self.tokens
        for token in tokens:
            if token.text != "?" or not self.mutable(token):
                continue
            j, depth = token.index - 1, 0
            while j >= 0:
                text = tokens[j].text
                if text in (")", "]"):
                    depth += 1
                elif text in ("(", "["):
                    if depth == 0:
                        break
                    depth -= 1
                elif depth == 0 and text in ("=", "return", ",", ";", "{", "}", "?", ":"):
                    break
                j -= 1
            first, last = j + 1, token.index
            if first >= last:
                continue
            if tokens[first].text == "(" and self.source.matching(first, "(", ")") == last - 1:
                self.guard(first, last - 1, skip=False)
            else:
                self.add("guard-drop", tokens[first].start, tokens[last - 1].end, "true", first)

    # race
    def race(self, token):
        tokens, i = self.tokens, token.index
        j = i - 1
        while j >= 0 and tokens[j].text == "]":  # back over every [..] of the store's target
            j = self.source.matching(j, "]", "[", step=-1) - 1
        if j < 0 or tokens[j].kind != "ident" or tokens[j].text in self.source.local_arrays:
            return
        name = tokens[j]
        if token.text == "=":
            self.add("race", token.start, token.end, "+=", i)
        if name.text in self.source.shared_arrays:
            subscripts = tokens[j + 1:i]
            if all(t.text in ("[", "]") or _int_literal(t.text) == (0, "", None) for t in subscripts):
                return
            dims, depth = 0, 0
            for t in subscripts:
                if t.text == "[":
                    dims += depth == 0
                    depth += 1
                elif t.text == "]":
                    depth -= 1
            self.add("race", name.end, token.end, "[0]" * dims + " +=", i)


def generate(name, text):
    """Every mutant of one source, in source order, each with a stable id (see _mutant_id)."""
    source = Source(name, text)
    generator = _Generator(source)
    generator.run()
    generator.ternaries()
    mutants, seen = [], {}
    for operator, start, end, replacement, index in sorted(generator.edits, key=lambda e: (e[1], e[2], e[0], e[3])):
        mutated = text[:start] + replacement + text[end:]
        if mutated == text:
            continue
        region = source.regions[source.tokens[index].region] if source.tokens[index].region >= 0 else None
        function = region.name if region else "?"
        line = source.line_of(start)
        first_line_start = text.rfind("\n", 0, start) + 1
        last_line_end = text.find("\n", end)
        last_line_end = len(text) if last_line_end < 0 else last_line_end
        before = " ".join(text[first_line_start:last_line_end].split())
        after = " ".join(mutated[first_line_start:last_line_end + len(replacement) - (end - start)].split())
        key = (name, function, operator, before, after)
        occurrence = seen.get(key, 0)
        seen[key] = occurrence + 1
        mutants.append(Mutant(_mutant_id(key, occurrence), name, line, function, operator, start, end,
                              replacement, before, after))
    return mutants


def _mutant_id(key, occurrence):
    """source-stem:function:operator:hash of the changed line before and after. It names the change,
    not a line number: edits elsewhere in the file leave it alone, so the reviewed equivalents keep
    pointing at the same mutants."""
    name, function, operator, before, after = key
    digest = hashlib.sha256("\0".join((*key, str(occurrence))).encode()).hexdigest()[:8]
    return f"{Path(name).stem}:{function}:{operator}:{digest}"


def source_files(kernel_dir):
    files = sorted(p for p in Path(kernel_dir).iterdir() if p.suffix in SOURCE_SUFFIXES and p.is_file())
    if not files:
        raise ArgumentError(f"mutants: no {'/'.join(SOURCE_SUFFIXES)} files in {kernel_dir}")
    return files


def generate_all(kernel_dir, sources=None):
    mutants = []
    for path in source_files(kernel_dir):
        if sources and path.name not in sources:
            continue
        mutants += generate(path.name, path.read_text(encoding="utf-8"))
    ids = [m.id for m in mutants]
    assert len(ids) == len(set(ids)), "mutant ids collide"
    return mutants


# ----------------------------------------------------------------------------------------------
# equivalents


def load_equivalents(path=EQUIVALENTS_FILE):
    """{id: {"after": mutated line, "reason": why}} from the reviewed list (TOML, [[equivalent]])."""
    path = Path(path)
    if not path.is_file():
        return {}
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    entries = {}
    for entry in data.get("equivalent", []):
        missing = {"id", "after", "reason"} - entry.keys()
        if missing:
            raise ArgumentError(f"{path}: an [[equivalent]] entry lacks {sorted(missing)}: {entry}")
        if not entry["reason"].strip():
            raise ArgumentError(f"{path}: equivalent mutant {entry['id']} needs a reason")
        entries[entry["id"]] = entry
    return entries


# ----------------------------------------------------------------------------------------------
# running


@dataclasses.dataclass
class Result:
    mutant: Mutant
    status: str
    seconds: float = 0.0
    detail: str = ""
    carried: bool = False  # taken over from an earlier run (--resume)


def default_test_command(tests=DEFAULT_TESTS):
    return [sys.executable, "-m", "pytest", *PYTEST_OPTIONS, *tests]


def _worker_command(source, test_command, nvrtc):
    """The subprocess for one mutant: NVRTC only (test_command None) or the tests only."""
    command = [sys.executable, "-m", "gpuconv.cuda.tools.mutants", "--worker", source]
    if nvrtc:
        command.append("--nvrtc")
    return command + ["--"] + list(test_command or [])


EMULATOR_BUILD_FAILED = "the CUDA emulator could not compile"


def _run_one(command, env, timeout, cwd):
    start = time.monotonic()
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output, time.monotonic() - start
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the worker and any child it started
        output, _ = process.communicate()
        return None, output, time.monotonic() - start


def _failure_line(output):
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line[:300]
    tail = [line for line in output.splitlines() if line.strip()]
    return tail[-1][:300] if tail else ""


class _Server:
    """A persistent worker process (serve()) and a thread that queues its output lines."""

    RESTART_AFTER = 40  # mutants per worker: each leaves a loaded emulator library behind

    def __init__(self, pytest_args, env, cwd):
        command = [sys.executable, "-m", "gpuconv.cuda.tools.mutants", "--serve", "--", *pytest_args]
        self.process = subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        self.lines = queue.Queue()
        self.served = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def run(self, index, folder, timeout):
        """(code, output): code is pytest's exit status, None on a timeout, "crash" when the worker died
        (the mutant crashed the process: the tests caught it too)."""
        self.served += 1
        output = []
        try:
            self.process.stdin.write(f"{index}\t{folder}\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            return "crash", "the worker had already exited"
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                return None, "".join(output)
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.process.wait()
                return "crash", "".join(output) + f"\nthe test process died (exit status {self.process.returncode})"
            if line.startswith(RESULT_MARK):
                return json.loads(line[len(RESULT_MARK):])["code"], "".join(output)
            output.append(line)

    def alive(self):
        return self.process.poll() is None and self.served < self.RESTART_AFTER

    def kill(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the worker and any child it started
        self.process.wait()

    def close(self):
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def _changes_constants(mutant, text):
    """Whether the mutant changes an integer #define: the launch code reads those at import, so such
    a mutant needs a fresh process."""
    from ..runtime import _INT_DEFINE
    return _INT_DEFINE.findall(text) != _INT_DEFINE.findall(mutant.apply(text))


class Runner:
    """Runs mutants of the sources in `kernel_dir` against `test_command` on a copy of the folder with
    the one file mutated. A pytest command runs in `jobs` persistent worker processes (a mutant that
    changes an integer #define, read by the launch code at import, gets a fresh one); any other
    command runs in a subprocess per mutant."""

    def __init__(self, kernel_dir, test_command=None, jobs=2, budget=None, timeout=None, nvrtc=None,
                 cwd=ROOT, log=None):
        self.kernel_dir = Path(kernel_dir)
        self.test_command = list(test_command or default_test_command())
        self.jobs, self.budget, self.timeout = max(1, int(jobs)), budget, timeout
        self.nvrtc = _nvrtc_available() if nvrtc is None else nvrtc
        self.cwd = Path(cwd)
        self.log = log or (lambda message: None)
        self.baseline_seconds = None

    def _env(self, folder, cache):
        env = dict(os.environ)
        env["GPUCONV_KERNEL_DIR"] = str(folder)
        env["GPUCONV_EMULATOR_CACHE"] = str(cache)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def _copy(self, work, tag, mutant=None):
        folder = Path(work) / tag
        folder.mkdir()
        for path in source_files(self.kernel_dir):
            text = path.read_text(encoding="utf-8")
            if mutant is not None and path.name == mutant.source:
                text = mutant.apply(text)
            (folder / path.name).write_text(text, encoding="utf-8")
        return folder

    def run(self, mutants):
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="gpuconv-mutants-") as work:
            cache = Path(work) / "emulator-cache"
            cache.mkdir()
            self._baseline(work, cache, mutants)
            timeout = self.timeout or max(30.0, 4 * self.baseline_seconds)
            results = [None] * len(mutants)
            lock = threading.Lock()
            done = [0]
            persistent = self.test_command[:3] == [sys.executable, "-m", "pytest"]
            original = Path(work) / "original"
            originals = {p.name: p.read_text(encoding="utf-8") for p in source_files(self.kernel_dir)}
            local, servers = threading.local(), []

            def one(index):
                mutant = mutants[index]
                if self.budget is not None and time.monotonic() - started > self.budget:
                    results[index] = Result(mutant, "not-run", detail="over the --budget")
                    return
                folder = self._copy(work, f"m{index}", mutant)
                env = self._env(folder, cache)
                if persistent and not _changes_constants(mutant, originals[mutant.source]):
                    server = getattr(local, "server", None)
                    if server is None or not server.alive():
                        if server is not None:
                            server.close()
                        server = local.server = _Server(self.test_command[3:], self._env(original, cache), self.cwd)
                        with lock:
                            servers.append(server)
                    begin = time.monotonic()
                    code, output = server.run(index, folder, timeout)
                    seconds = time.monotonic() - begin
                    if code == "crash":
                        code = -1
                else:
                    code, output, seconds = _run_one(_worker_command(mutant.source, self.test_command, False),
                                                     env, timeout, self.cwd)
                if self.nvrtc and code is not None and (code == 0 or EMULATOR_BUILD_FAILED in output):
                    nvrtc_code, nvrtc_output, nvrtc_seconds = _run_one(
                        _worker_command(mutant.source, None, True), env, timeout, self.cwd)
                    seconds += nvrtc_seconds
                    if nvrtc_code == COMPILE_ERROR_EXIT:
                        code, output = nvrtc_code, nvrtc_output
                shutil.rmtree(folder, ignore_errors=True)
                if code is None:
                    result = Result(mutant, "killed-by-timeout", seconds, f"no result after {timeout:.0f} s")
                elif code == COMPILE_ERROR_EXIT:
                    result = Result(mutant, "killed-by-compiler", seconds, _compile_error_line(output))
                elif code == 0:
                    result = Result(mutant, "survived", seconds)
                else:
                    result = Result(mutant, "killed", seconds, _failure_line(output) or f"exit status {code}")
                results[index] = result
                with lock:
                    done[0] += 1
                    self.log(f"[{done[0]}/{len(mutants)}] {result.status:18s} {seconds:5.1f}s {mutant.id}")

            try:
                with ThreadPoolExecutor(max_workers=self.jobs) as pool:
                    list(pool.map(one, range(len(mutants))))
            finally:
                for server in servers:
                    server.close()
        return results, time.monotonic() - started, timeout

    def _baseline(self, work, cache, mutants):
        """The tests must pass on the unmutated copy (else every mutant would count as killed)."""
        folder = self._copy(work, "original")
        sources = sorted({m.source for m in mutants}) or [source_files(self.kernel_dir)[0].name]
        start = time.monotonic()
        code, output, _ = _run_one(_worker_command(sources[0], self.test_command, False),
                                   self._env(folder, cache), None, self.cwd)
        self.baseline_seconds = time.monotonic() - start
        for source in sources if code == 0 and self.nvrtc else ():
            code, output, _ = _run_one(_worker_command(source, None, True), self._env(folder, cache), None, self.cwd)
            if code != 0:
                break
        if code != 0:
            raise ArgumentError(f"mutants: the tests (or NVRTC) fail on the UNMUTATED sources, so no mutant "
                                f"could survive; fix them first. Output:\n{output[-4000:]}")
        self.log(f"baseline: the tests pass on the unmutated sources ({self.baseline_seconds:.1f} s per run)")


def _compile_error_line(output):
    lines = [line for line in output.splitlines() if "error" in line]
    return (lines[0] if lines else output.strip()[-300:])[:300]


def _nvrtc_available():
    try:
        from .offline import _private_cupy
        _private_cupy()
        return True
    except Exception:
        return False


RESULT_MARK = "@@gpuconv-mutant-result@@ "


def _reset_kernel_sources():
    """Forget every source, constant, module and kernel read so far (the next mutant's folder is
    read afresh)."""
    from ..runtime import clear_kernel_cache, read_source, source_constants
    read_source.cache_clear()
    source_constants.cache_clear()
    clear_kernel_cache()


def serve(pytest_args):
    """A persistent worker: reads `index<TAB>folder` lines from stdin, runs pytest in this process on
    each folder (GPUCONV_KERNEL_DIR), prints RESULT_MARK + {"index", "code"} after each. Python's
    start and pytest's imports are paid once per worker instead of once per mutant."""
    import pytest
    for line in sys.stdin:
        index, folder = line.rstrip("\n").split("\t")
        os.environ["GPUCONV_KERNEL_DIR"] = folder
        _reset_kernel_sources()
        code = int(pytest.main(list(pytest_args)))
        print("\n" + RESULT_MARK + json.dumps({"index": int(index), "code": code}), flush=True)
    return 0


def worker(source, nvrtc, command):
    """In the subprocess: NVRTC-compile the (mutated) source when asked, then run the tests (if any)."""
    if nvrtc:
        from ...errors import KernelError
        from ..runtime import KERNELS, template_instances
        from .offline import compile_offline
        names = template_instances(KERNELS[source]) if source in KERNELS else ()
        try:
            compile_offline(source, NVRTC_ARCH, names, strict=False)
        except KernelError as exc:
            print(exc)
            return COMPILE_ERROR_EXIT
    if not command:
        return 0
    if command[:3] == [sys.executable, "-m", "pytest"]:
        import pytest
        return int(pytest.main(command[3:]))
    return subprocess.call(command)


# ----------------------------------------------------------------------------------------------
# report


def score(results, equivalents):
    """Counts per status and per operator; a survivor on the reviewed list counts as equivalent."""
    for result in results:
        if result.status == "survived" and result.mutant.id in equivalents:
            result.status = "equivalent"
            result.detail = equivalents[result.mutant.id]["reason"].strip()
    counts = {status: sum(r.status == status for r in results) for status in STATUSES}
    # Listed as equivalent, yet a test told it apart: the review was wrong (or the tests now check
    # something the kernels never promised); either way the entry needs another look.
    killed_equivalents = [r.mutant.id for r in results if r.mutant.id in equivalents and r.status.startswith("killed")]
    by_operator = {}
    for result in results:
        row = by_operator.setdefault(result.mutant.operator, {status: 0 for status in STATUSES})
        row[result.status] += 1
    killed = counts["killed"] + counts["killed-by-compiler"] + counts["killed-by-timeout"]
    run = len(results) - counts["not-run"]
    return {
        "total": len(results), "run": run, "counts": counts, "killed": killed,
        # of the mutants that ran; equivalents can never be killed, so the score leaves them out
        "score": killed / (run - counts["equivalent"]) if run > counts["equivalent"] else None,
        "killed_fraction_of_all": killed / run if run else None,
        "by_operator": by_operator,
        "killed_equivalents": killed_equivalents,
    }


def carried_results(path, mutants):
    """{id: Result} of the mutants a previous run (its --json output) killed, for the mutants that are
    generated again unchanged. Adding tests never revives a killed mutant: its killing test still runs."""
    try:
        previous = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ArgumentError(f"--resume: expected the --json output of an earlier run, could not read {path}: {exc}")
    by_id = {m.id: m for m in mutants}
    carried = {}
    for entry in previous.get("mutants", []):
        mutant = by_id.get(entry.get("id"))
        if mutant is not None and entry.get("after") == mutant.after and entry.get("status", "").startswith("killed"):
            carried[mutant.id] = Result(mutant, entry["status"], entry.get("seconds", 0.0),
                                        entry.get("detail", ""), carried=True)
    return carried


def stale_equivalents(equivalents, mutants):
    """Reviewed entries whose id no longer names a generated mutant, or names a different change."""
    by_id = {m.id: m for m in mutants}
    stale = []
    for identifier, entry in equivalents.items():
        mutant = by_id.get(identifier)
        if mutant is None or " ".join(entry["after"].split()) != mutant.after:
            stale.append(identifier)
    return stale


def format_report(results, summary, elapsed, stale=()):
    lines = []
    c = summary["counts"]
    carried = sum(r.carried for r in results)
    lines.append(f"mutants: {summary['total']} generated, {summary['run']} run in {elapsed:.0f} s"
                 + (f" ({carried} killed ones carried over from an earlier run)" if carried else ""))
    lines.append(f"killed {summary['killed']} (by the tests {c['killed']}, by the compiler {c['killed-by-compiler']}, "
                 f"by the timeout {c['killed-by-timeout']}), equivalent {c['equivalent']}, "
                 f"survived {c['survived']}, not run {c['not-run']}")
    if summary["score"] is not None:
        lines.append(f"mutation score: {summary['killed']}/{summary['run'] - c['equivalent']} = "
                     f"{100 * summary['score']:.1f}% of the non-equivalent mutants killed "
                     f"({100 * summary['killed_fraction_of_all']:.1f}% of all that ran)")
    lines.append("")
    header = ("operator", "total", "killed", "compiler", "timeout", "equivalent", "survived", "not run")
    rows = [header]
    for operator in OPERATORS:
        row = summary["by_operator"].get(operator)
        if row:
            rows.append((operator, str(sum(row.values())), str(row["killed"]), str(row["killed-by-compiler"]),
                         str(row["killed-by-timeout"]), str(row["equivalent"]), str(row["survived"]),
                         str(row["not-run"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(cell.rjust(w) if k else cell.ljust(w) for k, (cell, w) in enumerate(zip(r, widths)))
              for r in rows]
    survivors = [r for r in results if r.status == "survived"]
    lines.append("")
    lines.append(f"survivors ({len(survivors)}):" if survivors else "survivors: none")
    for result in survivors:
        lines.append(f"  {result.mutant.id}  [{result.mutant.operator}]")
        lines += ["    " + line for line in result.mutant.diff().splitlines()]
    equivalent = [r for r in results if r.status == "equivalent"]
    if equivalent:
        lines.append("")
        lines.append(f"equivalent (reviewed, {EQUIVALENTS_FILE.name}): {len(equivalent)}")
        for result in equivalent:
            lines.append(f"  {result.mutant.id}  {result.mutant.source}:{result.mutant.line}  {result.mutant.after}")
    if summary.get("killed_equivalents"):
        lines.append("")
        lines.append(f"listed in {EQUIVALENTS_FILE.name} but killed (review the entry): "
                     + ", ".join(summary["killed_equivalents"]))
    if stale:
        lines.append("")
        lines.append(f"stale entries in {EQUIVALENTS_FILE.name} (no such mutant, or a different change): "
                     + ", ".join(stale))
    return "\n".join(lines)


def to_json(results, summary, elapsed, argv, timeout, baseline, stale=()):
    return {
        "command": "python -m gpuconv mutants " + " ".join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "elapsed_s": round(elapsed, 1),
        "baseline_run_s": round(baseline, 1) if baseline else None,
        "timeout_s": round(timeout, 1) if timeout else None,
        **{k: summary[k] for k in ("total", "run", "killed", "counts", "score", "killed_fraction_of_all",
                                   "by_operator", "killed_equivalents")},
        "stale_equivalents": list(stale),
        "carried_over": sum(r.carried for r in results),
        "mutants": [{**r.mutant.summary(), "status": r.status, "seconds": round(r.seconds, 2), "detail": r.detail,
                     **({"carried_over": True} if r.carried else {})} for r in results],
    }


# ----------------------------------------------------------------------------------------------
# command line


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--serve"]:
        return serve(argv[argv.index("--") + 1:])
    if argv[:1] == ["--worker"]:
        separator = argv.index("--")
        options, command = argv[1:separator], argv[separator + 1:]
        return worker(options[0], "--nvrtc" in options, command)
    parser = argparse.ArgumentParser(
        prog="python -m gpuconv mutants", formatter_class=HelpFormatter,
        description="Mutation testing of the CUDA kernels: plant systematic slips in copies of kernels/*.cu, "
                    "run the emulated kernel tests on each, print the mutation score and every survivor. "
                    "Exits 1 when a mutant survives that the reviewed equivalents list does not explain.")
    parser.add_argument("--kernel-dir", type=Path, default=None,
                        help="folder of .cu sources to mutate (default: gpuconv's kernels/)")
    parser.add_argument("--source", action="append", help="only this source file, repeatable")
    parser.add_argument("--operator", action="append", choices=OPERATORS, help="only this operator, repeatable")
    parser.add_argument("--only", action="append", metavar="ID", help="only the mutant with this id, repeatable")
    parser.add_argument("--shuffle", type=int, metavar="SEED",
                        help="run the mutants in a seeded random order (the report keeps source order): a run "
                             "cut short by --budget then leaves a uniform sample, not the first kernels only")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit without running them")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run in parallel")
    parser.add_argument("--budget", type=float, default=3600.0,
                        help="seconds for the whole run; mutants not started by then are reported as not run")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per mutant before it counts as killed by the timeout "
                             "(default: 4x the unmutated run, at least 30)")
    parser.add_argument("--no-nvrtc", action="store_true",
                        help="skip the NVRTC compile of each mutant (it is skipped anyway without CuPy)")
    parser.add_argument("--tests", nargs="+", default=list(DEFAULT_TESTS),
                        help="pytest paths run on each mutant (with " + " ".join(PYTEST_OPTIONS) + ")")
    parser.add_argument("--equivalents", type=Path, default=EQUIVALENTS_FILE,
                        help="reviewed list of equivalent mutants (TOML)")
    parser.add_argument("--resume", type=Path, metavar="FILE",
                        help="a previous --json output: its killed mutants that are still generated unchanged "
                             "keep their result (added tests cannot revive them), the rest run")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON to FILE ('-': stdout)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise ArgumentError(f"--jobs: expected an int >= 1, got {args.jobs}")
    if args.budget <= 0 or (args.timeout is not None and args.timeout <= 0):
        raise ArgumentError("--budget and --timeout: expected seconds > 0")

    from ..runtime import kernel_dir
    folder = args.kernel_dir or Path(str(kernel_dir()))
    mutants = generate_all(folder, args.source)
    if args.operator:
        mutants = [m for m in mutants if m.operator in args.operator]
    if args.only:
        unknown = set(args.only) - {m.id for m in mutants}
        if unknown:
            raise ArgumentError(f"--only: no generated mutant has the id(s) {sorted(unknown)}")
        mutants = [m for m in mutants if m.id in args.only]
    if args.list:
        for mutant in mutants:
            print(f"{mutant.id}  [{mutant.operator}]  {mutant.source}:{mutant.line}\n    + {mutant.after}")
        print(f"{len(mutants)} mutants")
        return 0
    equivalents = load_equivalents(args.equivalents)
    stale = stale_equivalents(equivalents, generate_all(folder)) if not args.kernel_dir else []
    to_stderr = lambda message: print(message, file=sys.stderr, flush=True)
    runner = Runner(folder, default_test_command(args.tests), jobs=args.jobs, budget=args.budget,
                    timeout=args.timeout, nvrtc=False if args.no_nvrtc else None, log=to_stderr)
    carried = carried_results(args.resume, mutants) if args.resume else {}
    to_run = [m for m in mutants if m.id not in carried]
    if args.shuffle is not None:
        import random
        random.Random(args.shuffle).shuffle(to_run)
    to_stderr(f"{len(mutants)} mutants ({len(carried)} killed ones carried over from {args.resume}), "
              f"{len(to_run)} to run, {args.jobs} jobs, NVRTC {'on' if runner.nvrtc else 'off'}")
    ran, elapsed, timeout = runner.run(to_run)
    by_id = {r.mutant.id: r for r in ran}
    results = [carried.get(m.id) or by_id[m.id] for m in mutants]
    summary = score(results, equivalents)
    report = format_report(results, summary, elapsed, stale)
    if args.json:
        payload = json.dumps(to_json(results, summary, elapsed, argv, timeout, runner.baseline_seconds, stale),
                             indent=1)
        if str(args.json) == "-":
            print(payload)
        else:
            args.json.write_text(payload + "\n")
            print(report)
    else:
        print(report)
    return 1 if summary["counts"]["survived"] or stale or summary["killed_equivalents"] else 0


if __name__ == "__main__":
    sys.exit(main())
