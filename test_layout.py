"""The layout of dispatch.py: sections in calling order, as its map says.

dispatch.py is one module in sections, each under a banner::

    # ---------------------------------------------------------------------------
    # Title: what the section holds
    # ---------------------------------------------------------------------------

and its docstring's map lists them in the same order. A section uses only
the names bound above it, never those of a later section: read from the top,
each section is understood with what came before it, and calls flow downwards.
These checks keep it so; the synthetic modules below show that they can fail.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import io
import os
import re
import textwrap
import tokenize
from collections.abc import Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = os.path.join(HERE, "dispatch.py")
TESTS = os.path.join(HERE, "test_dispatch.py")  # its banners follow the module's sections
# A section longer than this holds two ideas: split it where they part.
MOST_SECTION_LINES = 800
TOP = "the top of the module"  # imports, __version__, __all__: above every section

BANNER_RULE = re.compile(r"# -{20,}")
MAP_ENTRY = re.compile(r" {4}(\S.*?) {2,}\S")  # "    name   what it holds", continuations indented further


@dataclasses.dataclass(frozen=True)
class Section:
    """One section of a module: its banner's title and its lines (1-based, inclusive)."""

    title: str
    first: int
    last: int

    @property
    def name(self) -> str:
        """The title before its colon: "Links: interfaces, ..." is "Links"."""
        return self.title.partition(":")[0]

    def __len__(self) -> int:
        return self.last - self.first + 1


@functools.lru_cache(maxsize=4)
def parsed(source: str) -> ast.Module:
    """``source`` parsed once, however many checks read it."""
    return ast.parse(source)


@functools.lru_cache(maxsize=4)
def sections(source: str) -> tuple[Section, ...]:
    """The sections of ``source``, in order, the lines above the first banner
    as TOP. A banner is a rule, title lines, a rule, all comments at column 0."""
    comments = {
        start[0]: text
        for kind, text, start, _, _ in tokenize.generate_tokens(io.StringIO(source).readline)
        if kind == tokenize.COMMENT and start[1] == 0
    }
    starts: list[tuple[int, str]] = [(1, TOP)]
    rules = sorted(line for line, text in comments.items() if BANNER_RULE.fullmatch(text))
    for opening, closing in zip(rules, rules[1:]):
        titles = [comments.get(line, "") for line in range(opening + 1, closing)]
        if titles and all(title.startswith("# ") for title in titles):
            starts.append((opening, " ".join(title[2:].strip() for title in titles)))
    count = len(source.splitlines())
    ends = [start - 1 for start, _ in starts[1:]] + [count]
    return tuple(Section(title, first, last) for (first, title), last in zip(starts, ends))


# Names bound by a statement in the scope it runs in (not in the functions,
# classes, lambdas and comprehensions it defines, which have scopes of their own).
NEW_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.GeneratorExp)
COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _same_scope(node: ast.AST) -> Iterator[ast.AST]:
    """``node`` and what it holds, but not the inside of a scope it opens:
    of a function or a class, only the name is bound here."""
    yield node
    if not isinstance(node, (*NEW_SCOPES, *COMPREHENSIONS)):
        for child in ast.iter_child_nodes(node):
            yield from _same_scope(child)


def _bound_by(node: ast.AST) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
        return {node.id}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(alias.asname or alias.name).partition(".")[0] for alias in node.names}
    if isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
        return {node.name}
    return set()


def bound_names(statements: list[ast.stmt]) -> set[str]:
    """The names these statements bind in their own scope."""
    return {name for statement in statements for node in _same_scope(statement) for name in _bound_by(node)}


def _arguments(arguments: ast.arguments) -> set[str]:
    every = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs, arguments.vararg, arguments.kwarg]
    return {argument.arg for argument in every if argument is not None}


def _global_declared(body: list[ast.stmt]) -> set[str]:
    return {
        name
        for statement in body
        for node in _same_scope(statement)
        if isinstance(node, ast.Global)
        for name in node.names
    }


def _chain(node: ast.Name, parents: dict[ast.AST, ast.AST]) -> str:
    """``node``'s name with the attributes taken of it: ``Balance.MEASURED``."""
    text, current = node.id, parents.get(node)
    while isinstance(current, ast.Attribute):
        text += "." + current.attr
        current = parents.get(current)
    return text


Loads = Iterator[tuple[ast.Name, str]]


class ModuleNameLoads:
    """The names a top-level statement reads from the module's scope,
    wherever it reads them (function bodies, annotations, default values,
    decorators, class bodies), each with its attribute chain; names local to
    a function, a lambda, a comprehension or a class body are left out."""

    def __init__(self, statement: ast.stmt) -> None:
        self.statement = statement
        self.parents = {child: parent for parent in ast.walk(statement) for child in ast.iter_child_nodes(parent)}

    def __iter__(self) -> Loads:
        return self.visit(self.statement, frozenset())

    def visit(self, node: ast.AST, local: frozenset[str]) -> Loads:
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in local:
            yield node, _chain(node, self.parents)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _is_annotation(node, self.parents):
            yield from self.quoted(node, local)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from self.function(node, local, local)
        elif isinstance(node, ast.ClassDef):
            yield from self.class_body(node, local)
        elif isinstance(node, COMPREHENSIONS):
            targets = {
                name.id for each in node.generators for name in ast.walk(each.target) if isinstance(name, ast.Name)
            }
            for child in ast.iter_child_nodes(node):
                yield from self.visit(child, local | targets)
        else:
            for child in ast.iter_child_nodes(node):
                yield from self.visit(child, local)

    def quoted(self, node: ast.Constant, local: frozenset[str]) -> Loads:
        """The names of an annotation written as a string."""
        try:
            expression = ast.parse(str(node.value), mode="eval")
        except SyntaxError:
            return
        for name in ast.walk(expression):
            if isinstance(name, ast.Name) and name.id not in local:
                yield ast.copy_location(name, node), name.id

    def function(
        self,
        node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda,
        outer: frozenset[str],
        enclosing: frozenset[str],
    ) -> Loads:
        """Decorators, defaults and annotations are read where the function
        is defined (``outer``); its body where it runs, inside ``enclosing``."""
        arguments = node.args
        header: list[ast.AST] = [*arguments.defaults, *(d for d in arguments.kw_defaults if d is not None)]
        if not isinstance(node, ast.Lambda):
            every = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs, arguments.vararg, arguments.kwarg]
            header += [*node.decorator_list, *(a.annotation for a in every if a is not None and a.annotation)]
            header += [node.returns] if node.returns else []
        for part in header:
            yield from self.visit(part, outer)
        body = node.body if isinstance(node.body, list) else [ast.Expr(node.body)]
        local = (_arguments(arguments) | bound_names(body)) - _global_declared(body)
        for part in body:
            yield from self.visit(part, enclosing | local)

    def class_body(self, node: ast.ClassDef, local: frozenset[str]) -> Loads:
        """A class body's own names shadow the module's there (in its
        methods' defaults too), not in its methods' bodies."""
        for part in [*node.decorator_list, *node.bases, *node.keywords]:
            yield from self.visit(part, local)
        own = local | bound_names(node.body)
        for statement in node.body:
            if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from self.function(statement, own, local)
            else:
                yield from self.visit(statement, own)


def _is_annotation(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    parent = parents.get(node)
    if isinstance(parent, ast.arg):
        return parent.annotation is node
    if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return parent.returns is node
    if isinstance(parent, ast.AnnAssign):
        return parent.annotation is node
    return False


def later_section_uses(source: str) -> list[str]:
    """Each use, by a section, of a name a later section binds at the top
    level of the module: "SECTION uses NAME of LATER SECTION (line N)"."""
    tree = parsed(source)
    parts = sections(source)

    def section_of(line: int) -> int:
        return max(index for index, part in enumerate(parts) if part.first <= line)

    home: dict[str, int] = {}  # each top-level name and the section that binds it first
    for statement in tree.body:
        for name in sorted(bound_names([statement])):
            home.setdefault(name, section_of(statement.lineno))
    found = []
    for statement in tree.body:
        user = section_of(statement.lineno)
        for node, chain in ModuleNameLoads(statement):
            if home.get(node.id, -1) > user:
                later = parts[home[node.id]].name
                found.append(f"{parts[user].name} uses {chain} of {later} (line {node.lineno})")
    return found


def map_names(source: str) -> list[str]:
    """The section names the module docstring's map lists, in its order."""
    docstring = ast.get_docstring(parsed(source), clean=False) or ""
    _, _, after = docstring.partition("\nMap of this module")
    lines = after.splitlines()[1:]
    return [entry.group(1) for line in lines if (entry := MAP_ENTRY.match(line))]


def loosely(name: str) -> tuple[str, str]:
    """A section's name as the map and a banner both say it: its first two
    words, lower-cased ("reports and CLI" and "Reports and the command line"
    agree; "upstream" and "upstream proxies" do not)."""
    words = name.lower().split()
    return (words + ["", ""])[0], (words + ["", ""])[1]


def map_disagreements(source: str) -> list[str]:
    """Where the map's order of sections and the banners' differ."""
    listed = map_names(source)
    banners = [part.name for part in sections(source) if part.title != TOP]
    if [loosely(name) for name in listed] == [loosely(name) for name in banners]:
        return []
    return [f"the map lists {listed}", f"the banners say {banners}"]


def banners_out_of_order(tests: str, source: str) -> list[str]:
    """Each banner of the ``tests`` that names no section of ``source`` (as
    loosely as the map does), or names one above a section the banners
    before it named: the tests follow the module's order."""
    order = {loosely(part.name): index for index, part in enumerate(sections(source)) if part.title != TOP}
    found, reached = [], -1
    for part in sections(tests):
        if part.title == TOP:
            continue
        index = order.get(loosely(part.name))
        if index is None:
            found.append(f"{part.name!r} names no section of the module")
        elif index < reached:
            found.append(f"{part.name!r} comes after the tests of a later section")
        else:
            reached = index
    return found


WAY_OPENING = "connection's way through them:"


def connection_way(source: str) -> list[str]:
    """The steps of the module docstring's way of a connection, in order:
    "ConnectionHandler.handle -> ... -> relay"."""
    docstring = ast.get_docstring(parsed(source), clean=False) or ""
    _, found, after = docstring.partition(WAY_OPENING)
    paragraph = " ".join(after.split("\n\n")[0].split())
    return [step.strip().rstrip(".") for step in paragraph.split("->")] if found else []


def unknown_steps(source: str) -> list[str]:
    """The steps of the way that name no function, or no method of the
    class they name, at the top of the module."""
    defined = {node.name: node for node in parsed(source).body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    unknown = []
    for step in connection_way(source):
        name, _, method = step.partition(".")
        node = defined.get(name)
        methods = {part.name for part in node.body if isinstance(part, ast.FunctionDef)} if node else set()
        if node is None or (method and (not isinstance(node, ast.ClassDef) or method not in methods)):
            unknown.append(step)
    return unknown


def oversized_sections(source: str, most: int = MOST_SECTION_LINES) -> list[str]:
    """Each section longer than ``most`` lines, with its length."""
    return [f"{part.name}: {len(part)} lines" for part in sections(source) if len(part) > most]


def dispatch_source() -> str:
    with open(MODULE, encoding="utf-8") as module:
        return module.read()


def dispatch_tests_source() -> str:
    with open(TESTS, encoding="utf-8") as tests:
        return tests.read()


# ---------------------------------------------------------------------------
# dispatch.py as it is
# ---------------------------------------------------------------------------


def test_no_section_of_dispatch_uses_a_name_of_a_later_section() -> None:
    assert later_section_uses(dispatch_source()) == []


def test_a_use_of_a_later_name_put_into_dispatch_is_found() -> None:
    source = dispatch_source()
    first = sections(source)[1]  # the first section under a banner
    lines = source.splitlines()
    lines.insert(first.first + 3, "_used_too_early = Dispatcher.shutdown")
    found = later_section_uses("\n".join(lines))
    assert found == [f"{first.name} uses Dispatcher.shutdown of Dispatcher (line {first.first + 4})"]


def test_the_map_in_dispatchs_docstring_lists_the_sections_in_the_banners_order() -> None:
    source = dispatch_source()
    assert len(map_names(source)) >= 10  # the map was found
    assert map_disagreements(source) == []


def test_no_section_of_dispatch_is_longer_than_800_lines() -> None:
    assert oversized_sections(dispatch_source()) == []


def test_the_banners_of_dispatchs_tests_name_its_sections_in_their_order() -> None:
    assert len(sections(dispatch_tests_source())) >= 10  # the banners were found
    assert banners_out_of_order(dispatch_tests_source(), dispatch_source()) == []


def test_the_way_of_a_connection_in_dispatchs_docstring_names_its_functions() -> None:
    source = dispatch_source()
    way = connection_way(source)
    assert way[:1] == ["ConnectionHandler.handle"] and way[-1:] == ["relay"] and len(way) >= 5
    assert unknown_steps(source) == []


# ---------------------------------------------------------------------------
# The checks themselves, on small modules written for them
# ---------------------------------------------------------------------------

TWO_SECTIONS = '''\
"""A module.

Map of this module, in order:

    first     the first part
    second    the second part,
              on two lines
"""

import os

# ---------------------------------------------------------------------------
# First: the first part
# ---------------------------------------------------------------------------

LIMIT = 3


{first}


# ---------------------------------------------------------------------------
# Second: the second part,
# told over two lines
# ---------------------------------------------------------------------------


class Later:
    """Bound in the second section."""

    size = LIMIT


def later() -> int:
    return Later.size + len(os.sep)
'''


def module(first: str) -> str:
    """TWO_SECTIONS with ``first`` as the code of its first section."""
    return TWO_SECTIONS.format(first=textwrap.dedent(first).strip())


def test_sections_are_found_by_their_banners_with_titles_of_several_lines() -> None:
    found = sections(module("x = 1"))
    assert [(part.title, part.name) for part in found] == [
        (TOP, TOP),
        ("First: the first part", "First"),
        ("Second: the second part, told over two lines", "Second"),
    ]
    assert found[0].first == 1 and found[-1].last == len(module("x = 1").splitlines())
    assert all(part.last + 1 == after.first for part, after in zip(found, found[1:]))


def test_a_later_sections_name_is_found_in_bodies_annotations_defaults_and_class_bodies() -> None:
    source = module(
        """
        def in_a_body() -> int:
            return later()


        def in_an_annotation(thing: Later) -> None:
            pass


        def in_a_default(size: int = Later.size) -> int:
            return size


        class InAClassBody:
            made = staticmethod(later)


        def in_a_comprehension() -> list[int]:
            return [later() for _ in range(LIMIT)]


        def in_a_quoted_annotation() -> "Later":
            raise NotImplementedError
        """
    )
    assert later_section_uses(source) == [
        f"First uses later of Second (line {line_of(source, 'return later()')})",
        f"First uses Later of Second (line {line_of(source, 'def in_an_annotation')})",
        f"First uses Later.size of Second (line {line_of(source, 'def in_a_default')})",
        f"First uses later of Second (line {line_of(source, 'staticmethod(later)')})",
        f"First uses later of Second (line {line_of(source, 'return [later()')})",
        f"First uses Later of Second (line {line_of(source, 'def in_a_quoted_annotation')})",
    ]


def line_of(source: str, text: str) -> int:
    """The number of the first line of ``source`` that holds ``text``."""
    return next(number for number, line in enumerate(source.splitlines(), 1) if text in line)


def test_a_module_whose_sections_use_only_what_is_above_them_passes() -> None:
    source = module(
        """
        def takes_its_own(later: int, Later: str = "") -> int:
            # Parameters and locals named as a later section's names are not its names.
            total = later + len(Later)
            for item in [later for later in range(LIMIT)]:
                total += item
            return total


        def binds_its_own() -> int:
            later = 2
            return later + LIMIT + len(os.sep)


        class Sized:
            later = 1
            size = later * LIMIT


        lambda later: later
        """
    )
    assert later_section_uses(source) == []


def test_a_name_bound_above_and_again_below_belongs_above() -> None:
    source = module("def later() -> int:\n    return 0\n\n\nuse = later")
    assert later_section_uses(source) == []


def test_a_map_out_of_the_banners_order_is_told() -> None:
    source = module("x = 1").replace("    first     the first part", "    zeroth    the first part")
    assert map_disagreements(source) == [
        "the map lists ['zeroth', 'second']",
        "the banners say ['First', 'Second']",
    ]
    assert map_disagreements(module("x = 1")) == []


TESTS_OF_TWO_SECTIONS = """\
# ---------------------------------------------------------------------------
# First: its tests
# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# {second}: its tests
# ---------------------------------------------------------------------------
"""


def test_tests_whose_banners_leave_the_modules_order_or_name_no_section_are_told() -> None:
    source = module("x = 1")
    assert banners_out_of_order(TESTS_OF_TWO_SECTIONS.format(second="Second"), source) == []
    assert banners_out_of_order(TESTS_OF_TWO_SECTIONS.format(second="Third"), source) == [
        "'Third' names no section of the module"
    ]
    backwards = TESTS_OF_TWO_SECTIONS.replace("First", "Second", 1).format(second="First")
    assert banners_out_of_order(backwards, source) == ["'First' comes after the tests of a later section"]


def test_a_step_of_the_way_that_names_nothing_in_the_module_is_told() -> None:
    source = module("x = 1").replace("Map of this module", f"A {WAY_OPENING} later -> Later.size\n\nMap")
    assert connection_way(source) == ["later", "Later.size"]
    assert unknown_steps(source) == ["Later.size"]  # an attribute, not a method
    assert unknown_steps(source.replace("-> Later.size", "-> Later.gone -> Gone.run")) == ["Later.gone", "Gone.run"]


def test_a_section_over_the_limit_is_told_by_name() -> None:
    source = module("\n".join(f"x{n} = {n}" for n in range(30)))
    assert oversized_sections(source, most=25) == ["First: 39 lines"]
    assert oversized_sections(source, most=40) == []


def test_the_map_names_and_the_banners_agree_loosely() -> None:
    assert loosely("reports and CLI") == loosely("Reports and the command line")
    assert loosely("Dispatcher") == loosely("dispatcher")
    assert loosely("upstream") != loosely("upstream proxies")
    assert loosely("platform probes") != loosely("platform start-up")
