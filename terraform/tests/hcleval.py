"""A small, fail-closed evaluator for Terraform configurations.

It reads `.tf` files with python-hcl2's Lark parse tree and evaluates the
subset of the Terraform language that Meridian's modules use: variables (with
defaults, module arguments and terraform.tfvars), locals, module outputs,
string templates, indexing, attribute access, splats, `for` expressions,
conditionals, operators, the common built-in functions, resource `count` and
`for_each`, and `dynamic` blocks. Provider aliases are followed so that every
module instance knows the region of its `aws` provider.

Anything it cannot know without an AWS account (resource attributes computed by
AWS, most data sources) evaluates to UNKNOWN. Callers must treat UNKNOWN as a
failure wherever the value matters: this evaluator never guesses.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import hcl2
from lark import Token, Tree


class EvalError(Exception):
    """The configuration uses something this evaluator cannot follow."""


class _Unknown:
    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN = _Unknown()
UNKNOWN_MARK = "\x00"


class Partial(str):
    """A template string with unknown parts, each shown as UNKNOWN_MARK."""


def is_known(value: Any) -> bool:
    if value is UNKNOWN or isinstance(value, Partial):
        return False
    if isinstance(value, list):
        return all(is_known(v) for v in value)
    if isinstance(value, dict):
        return all(is_known(v) for v in value.values())
    return True


# --------------------------------------------------------------------------
# Parsing: files -> blocks and attributes
# --------------------------------------------------------------------------


@dataclass
class Block:
    type: str
    labels: list[str]
    attrs: dict[str, Tree]
    blocks: list["Block"]
    file: str

    def children(self, block_type: str) -> list["Block"]:
        return [b for b in self.blocks if b.type == block_type]


def _token_text(node: Any) -> str:
    if isinstance(node, Token):
        return str(node)
    if isinstance(node, Tree):
        if node.data == "string":
            return _literal_string(node)
        parts = [_token_text(c) for c in node.children]
        return "".join(parts)
    raise EvalError(f"unexpected node {node!r}")


def _literal_string(tree: Tree) -> str:
    out = []
    for part in tree.children:
        if isinstance(part, Token):
            continue  # the quotes
        inner = part.children[0]
        if isinstance(inner, Token):
            out.append(_unescape(str(inner)))
        else:
            raise EvalError("a block label must be a literal string")
    return "".join(out)


def _trees(children: list) -> list[Tree]:
    return [c for c in children if isinstance(c, Tree) and c.data != "new_line_or_comment"]


def body_to_block(body: Tree, block_type: str, labels: list[str], file: str) -> Block:
    attrs: dict[str, Tree] = {}
    blocks: list[Block] = []
    for node in _trees(body.children):
        if node.data == "attribute":
            name = _token_text(node.children[0])
            attrs[name] = _trees(node.children[1:])[-1]
        elif node.data == "block":
            parts = _trees(node.children)
            inner_body = parts[-1]
            assert inner_body.data == "body", inner_body.data
            btype = _token_text(parts[0])
            blabels = [_token_text(p) for p in parts[1:-1]]
            blocks.append(body_to_block(inner_body, btype, blabels, file))
    return Block(block_type, labels, attrs, blocks, file)


def parse_file(path: str) -> Block:
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        tree = hcl2.parses_to_tree(text)
    except Exception as err:  # noqa: BLE001 - lark raises several error types
        raise EvalError(f"{path} does not parse: {str(err).strip().splitlines()[0]}") from err
    body = _trees(tree.children)[0]
    return body_to_block(body, "file", [], path)


def parse_expression(text: str) -> Tree:
    """Parse one expression (used for tfvars values and tests)."""
    block = body_to_block(_trees(hcl2.parses_to_tree(f"x = {text}\n").children)[0], "file", [], "<expr>")
    return block.attrs["x"]


# --------------------------------------------------------------------------
# Module configurations and instances
# --------------------------------------------------------------------------


@dataclass
class ModuleConfig:
    directory: str
    variables: dict[str, Block] = field(default_factory=dict)
    locals: dict[str, Tree] = field(default_factory=dict)
    outputs: dict[str, Block] = field(default_factory=dict)
    modules: dict[str, Block] = field(default_factory=dict)
    resources: list[Block] = field(default_factory=list)
    data: list[Block] = field(default_factory=list)
    providers: list[Block] = field(default_factory=list)
    tfvars: dict[str, Tree] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: str, with_tfvars: bool = False) -> "ModuleConfig":
        config = cls(os.path.abspath(directory))
        files = sorted(f for f in os.listdir(directory) if f.endswith(".tf"))
        if not files:
            raise EvalError(f"no .tf files in {directory}")
        for name in files:
            top = parse_file(os.path.join(directory, name))
            for block in top.blocks:
                config._add(block)
        if with_tfvars:
            names = ["terraform.tfvars"] + sorted(f for f in os.listdir(directory) if f.endswith(".auto.tfvars"))
            for name in names:
                path = os.path.join(directory, name)
                if os.path.exists(path):
                    config.tfvars.update(parse_file(path).attrs)
        return config

    def _add(self, block: Block) -> None:
        kind = block.type
        if kind == "variable":
            self.variables[block.labels[0]] = block
        elif kind == "locals":
            for name, expr in block.attrs.items():
                if name in self.locals:
                    raise EvalError(f"local.{name} defined twice in {self.directory}")
                self.locals[name] = expr
        elif kind == "output":
            self.outputs[block.labels[0]] = block
        elif kind == "module":
            self.modules[block.labels[0]] = block
        elif kind == "resource":
            self.resources.append(block)
        elif kind == "data":
            self.data.append(block)
        elif kind == "provider":
            self.providers.append(block)

    def resource(self, rtype: str, name: str) -> Optional[Block]:
        for block in self.resources:
            if block.labels == [rtype, name]:
                return block
        return None


class _Namespace:
    def __init__(self, getter: Callable[[str], Any]):
        self._getter = getter

    def attr(self, name: str) -> Any:
        return self._getter(name)


class Instance:
    """One instance of a module (the root, or a module call), with its values."""

    def __init__(
        self,
        config: ModuleConfig,
        address: str,
        providers: dict[str, Any],
        parent: Optional["Instance"] = None,
        call: Optional[Block] = None,
        root_dir: Optional[str] = None,
    ):
        self.config = config
        self.address = address
        self.providers = providers  # "aws" / "aws.alias" -> region (or UNKNOWN)
        self.parent = parent
        self.call = call
        self.root_dir = root_dir or config.directory
        self._vars: dict[str, Any] = {}
        self._locals: dict[str, Any] = {}
        self._children: dict[str, Instance] = {}
        self._busy: set[str] = set()

    @classmethod
    def root(cls, directory: str) -> "Instance":
        config = ModuleConfig.load(directory, with_tfvars=True)
        instance = cls(config, "root", {})
        for block in config.providers:
            name = block.labels[0]
            alias = block.attrs.get("alias")
            key = name if alias is None else f"{name}.{instance.eval(alias)}"
            region = block.attrs.get("region")
            instance.providers[key] = UNKNOWN if region is None else instance.eval(region)
        return instance

    # -- values ---------------------------------------------------------------

    def _guard(self, key: str, compute: Callable[[], Any]) -> Any:
        if key in self._busy:
            raise EvalError(f"reference cycle at {self.address}: {key}")
        self._busy.add(key)
        try:
            return compute()
        finally:
            self._busy.discard(key)

    def var(self, name: str) -> Any:
        if name not in self._vars:
            if name not in self.config.variables:
                raise EvalError(f"{self.address}: undeclared variable var.{name}")
            self._vars[name] = self._guard(f"var.{name}", lambda: self._var_value(name))
        return self._vars[name]

    def _var_value(self, name: str) -> Any:
        if self.call is not None and name in self.call.attrs:
            return self.parent.eval(self.call.attrs[name])
        if self.call is None and name in self.config.tfvars:
            return self.eval(self.config.tfvars[name])
        default = self.config.variables[name].attrs.get("default")
        if default is None:
            return UNKNOWN  # required and not given here (e.g. set at apply time)
        return self.eval(default)

    def local(self, name: str) -> Any:
        if name not in self._locals:
            if name not in self.config.locals:
                raise EvalError(f"{self.address}: undeclared local.{name}")
            self._locals[name] = self._guard(f"local.{name}", lambda: self.eval(self.config.locals[name]))
        return self._locals[name]

    def child(self, name: str) -> "Instance":
        if name not in self._children:
            call = self.config.modules.get(name)
            if call is None:
                raise EvalError(f"{self.address}: no module {name}")
            if "count" in call.attrs or "for_each" in call.attrs:
                raise EvalError(f"{self.address}: module.{name} uses count/for_each, which this test does not follow")
            source = self.eval(call.attrs["source"])
            if not isinstance(source, str) or not source.startswith(("./", "../")):
                raise EvalError(f"{self.address}: module.{name} has a non-local source {source!r}")
            directory = os.path.normpath(os.path.join(self.config.directory, source))
            providers = self._child_providers(call)
            address = f"module.{name}" if self.parent is None else f"{self.address}.module.{name}"
            self._children[name] = Instance(
                ModuleConfig.load(directory), address, providers, self, call, self.root_dir
            )
        return self._children[name]

    def children(self) -> list["Instance"]:
        return [self.child(name) for name in sorted(self.config.modules)]

    def _child_providers(self, call: Block) -> dict[str, Any]:
        mapping = call.attrs.get("providers")
        if mapping is None:
            return {k: v for k, v in self.providers.items() if "." not in k}
        result = {}
        obj = _unwrap(mapping)
        if obj.data != "object":
            raise EvalError(f"{self.address}: providers must be an object")
        for elem in _trees(obj.children):
            key_tree, value_tree = _trees(elem.children)
            inner = key_tree.children[0]
            key = _traversal(inner)
            value = _traversal(value_tree)
            if value not in self.providers:
                raise EvalError(f"{self.address}: provider {value} is not configured")
            result[key] = self.providers[value]
        return result

    def output(self, name: str) -> Any:
        block = self.config.outputs.get(name)
        if block is None:
            raise EvalError(f"{self.address}: no output {name}")
        return self._guard(f"output.{name}", lambda: self.eval(block.attrs["value"]))

    def provider_region(self, block: Optional[Block] = None) -> Any:
        if block is not None and "region" in block.attrs and block.type != "provider":
            return self.eval(block.attrs["region"])
        key = "aws"
        if block is not None and "provider" in block.attrs:
            key = _traversal(block.attrs["provider"])
        return self.providers.get(key, UNKNOWN)

    # -- expressions ----------------------------------------------------------

    def eval(self, tree: Tree, extra: Optional[dict[str, Any]] = None) -> Any:
        return Evaluator(self, extra or {}).eval(tree)

    def resource_attr(self, rtype: str, name: str, attr: str) -> Any:
        block = self.config.resource(rtype, name)
        if block is None or "count" in block.attrs or "for_each" in block.attrs:
            return UNKNOWN
        if attr in ("id", "bucket") and rtype == "aws_s3_bucket":
            attr = "bucket"
        if attr in block.attrs:
            return self._guard(f"{rtype}.{name}.{attr}", lambda: self.eval(block.attrs[attr]))
        return UNKNOWN

    def data_attr(self, dtype: str, name: str, attr: str) -> Any:
        if dtype == "aws_region" and attr in ("name", "region", "id"):
            for block in self.config.data:
                if block.labels == [dtype, name]:
                    return self.provider_region(block)
        return UNKNOWN

    # -- expansion of resources and dynamic blocks ----------------------------

    def expand(self, block: Block) -> list[dict[str, Any]]:
        """The scopes (each/count) of a resource's instances."""
        if "count" in block.attrs:
            count = self.eval(block.attrs["count"])
            if not isinstance(count, int):
                raise EvalError(f"{self.address}: count of {'.'.join(block.labels)} is not known")
            return [{"count": {"index": i}} for i in range(count)]
        if "for_each" in block.attrs:
            items = self.eval(block.attrs["for_each"])
            return [{"each": {"key": k, "value": v}} for k, v in _iterate(items, f"for_each of {'.'.join(block.labels)}")]
        return [{}]

    def nested(self, block: Block, block_type: str, extra: dict[str, Any]) -> list[tuple[Block, dict[str, Any]]]:
        """Nested blocks of one type, static and dynamic, with their scopes."""
        found = [(b, extra) for b in block.children(block_type)]
        for dyn in block.children("dynamic"):
            if dyn.labels != [block_type]:
                continue
            iterator = block_type
            if "iterator" in dyn.attrs:
                iterator = _traversal(dyn.attrs["iterator"])
            items = self.eval(dyn.attrs["for_each"], extra)
            (content,) = dyn.children("content")
            for key, value in _iterate(items, f"dynamic {block_type}"):
                scope = dict(extra)
                scope[iterator] = {"key": key, "value": value}
                found.append((content, scope))
        return found


def _iterate(items: Any, what: str) -> list[tuple[Any, Any]]:
    if isinstance(items, dict):
        return [(k, items[k]) for k in sorted(items)]
    if isinstance(items, list):
        return [(v if isinstance(v, str) else i, v) for i, v in enumerate(items)]
    raise EvalError(f"{what} is not known")


def _unwrap(tree: Tree) -> Tree:
    while isinstance(tree, Tree) and tree.data == "expr_term" and len(_trees(tree.children)) == 1 and not any(
        isinstance(c, Token) and c.type == "LPAR" for c in tree.children
    ):
        tree = _trees(tree.children)[0]
    return tree


def _traversal(tree: Tree) -> str:
    """A static reference such as aws.eu_west_1 as text."""
    tree = _unwrap(tree)
    if tree.data == "identifier":
        return str(tree.children[0])
    if tree.data == "get_attr_expr_term":
        base, attr = _trees(tree.children)
        return f"{_traversal(base)}.{_token_text(_trees(attr.children)[0])}"
    raise EvalError(f"expected a reference, found {tree.data}")


_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}


def _unescape(text: str) -> str:
    def repl(match: re.Match) -> str:
        body = match.group(1)
        if body[0] in _ESCAPES:
            return _ESCAPES[body[0]] + body[1:]
        if body[0] in "uU":
            return chr(int(body[1:], 16))
        return body

    text = re.sub(r"\\(u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", repl, text)
    return text.replace("$${", "${").replace("%%{", "%{")


# --------------------------------------------------------------------------
# Expressions
# --------------------------------------------------------------------------


class Evaluator:
    def __init__(self, instance: Instance, extra: dict[str, Any]):
        self.instance = instance
        self.extra = extra

    def eval(self, tree: Any) -> Any:
        if isinstance(tree, Token):
            raise EvalError(f"unexpected token {tree!r}")
        handler = getattr(self, f"_{tree.data}", None)
        if handler is None:
            raise EvalError(f"{self.instance.address}: unsupported expression {tree.data}")
        return handler(tree)

    # terms
    def _expr_term(self, tree: Tree) -> Any:
        return self.eval(_trees(tree.children)[0])

    def _int_lit(self, tree: Tree) -> Any:
        return int(str(tree.children[0]))

    def _float_lit(self, tree: Tree) -> Any:
        return float(str(tree.children[0]))

    def _literal_value(self, tree: Tree) -> Any:
        return {"true": True, "false": False, "null": None}[str(tree.children[0])]

    def _string(self, tree: Tree) -> Any:
        parts: list[str] = []
        partial = False
        for part in tree.children:
            if isinstance(part, Token):
                continue
            inner = part.children[0]
            if isinstance(inner, Token):
                parts.append(_unescape(str(inner)))
                continue
            if inner.data != "interpolation":
                return UNKNOWN  # template directives
            value = self.eval(_trees(inner.children)[0])
            if isinstance(value, Partial):
                partial = True
                parts.append(str(value))
            elif value is UNKNOWN or isinstance(value, (list, dict)):
                partial = True
                parts.append(UNKNOWN_MARK)
            else:
                parts.append(_to_string(value))
        text = "".join(parts)
        return Partial(text) if partial else text

    def _heredoc_template(self, tree: Tree) -> Any:
        text = str(tree.children[0])
        body = text.split("\n", 1)[1].rsplit("\n", 2)[0]
        return UNKNOWN if "${" in body or "%{" in body else body + "\n"

    _heredoc_template_trim = _heredoc_template

    def _template_string(self, tree: Tree) -> Any:
        return UNKNOWN

    def _tuple(self, tree: Tree) -> Any:
        return [self.eval(c) for c in _trees(tree.children)]

    def _object(self, tree: Tree) -> Any:
        result = {}
        for elem in _trees(tree.children):
            key_tree, value_tree = _trees(elem.children)
            inner = key_tree.children[0]
            if isinstance(inner, Tree) and inner.data == "keyword":
                key = str(inner.children[0])
            else:
                bare = _unwrap(inner)
                if bare.data == "identifier":
                    key = str(bare.children[0])
                else:
                    key = self.eval(inner)
            if not isinstance(key, str):
                if key is UNKNOWN or isinstance(key, Partial):
                    return UNKNOWN
                key = _to_string(key)
            result[key] = self.eval(value_tree)
        return result

    def _identifier(self, tree: Tree) -> Any:
        name = str(tree.children[0])
        if name in self.extra:
            return self.extra[name]
        inst = self.instance
        if name == "var":
            return _Namespace(inst.var)
        if name == "local":
            return _Namespace(inst.local)
        if name == "module":
            return _Namespace(lambda n: _Namespace(inst.child(n).output))
        if name == "data":
            return _Namespace(lambda t: _Namespace(lambda n: _Namespace(lambda a: inst.data_attr(t, n, a))))
        if name == "path":
            return {"module": inst.config.directory, "root": inst.root_dir, "cwd": inst.root_dir}
        if name == "terraform":
            return {"workspace": "default"}
        if name in ("each", "count", "self", "ephemeral"):
            return UNKNOWN
        if any(b.labels[0] == name for b in inst.config.resources):
            return _Namespace(lambda n: _Namespace(lambda a: inst.resource_attr(name, n, a)))
        raise EvalError(f"{inst.address}: unknown name {name}")

    def _get_attr_expr_term(self, tree: Tree) -> Any:
        base_tree, attr = _trees(tree.children)
        return _get_attr(self.eval(base_tree), _token_text(_trees(attr.children)[0]))

    def _index_expr_term(self, tree: Tree) -> Any:
        base_tree, index = _trees(tree.children)
        return _index(self.eval(base_tree), self._index_key(index))

    def _index_key(self, index: Tree) -> Any:
        if index.data == "short_index":
            return int(str(index.children[-1]))
        return self.eval(_trees(index.children)[0])

    def _splat(self, tree: Tree) -> Any:
        base_tree, splat = _trees(tree.children)
        base = self.eval(base_tree)
        if base is UNKNOWN:
            return UNKNOWN
        if base is None:
            return []
        items = base if isinstance(base, list) else [base]
        result = []
        for item in items:
            for op in _trees(splat.children):
                if op.data == "get_attr":
                    item = _get_attr(item, _token_text(_trees(op.children)[0]))
                else:
                    item = _index(item, self._index_key(op))
            result.append(item)
        return result

    _attr_splat_expr_term = _splat
    _full_splat_expr_term = _splat

    def _conditional(self, tree: Tree) -> Any:
        cond, yes, no = _trees(tree.children)
        value = self.eval(cond)
        if not isinstance(value, bool):
            return UNKNOWN
        return self.eval(yes if value else no)

    def _binary_op(self, tree: Tree) -> Any:
        left_tree, term = _trees(tree.children)[:2]
        op_tree, right_tree = _trees(term.children)
        op = str(op_tree.children[0])
        left = self.eval(left_tree)
        if op == "&&" and left is False:
            return False
        if op == "||" and left is True:
            return True
        right = self.eval(right_tree)
        if op in ("==", "!="):
            if not (is_known(left) and is_known(right)):
                return UNKNOWN
            return (left == right) if op == "==" else (left != right)
        if not (is_known(left) and is_known(right)):
            return UNKNOWN
        ops = {
            "+": lambda a, b: a + b,
            "-": lambda a, b: a - b,
            "*": lambda a, b: a * b,
            "/": lambda a, b: a / b,
            "%": lambda a, b: a % b,
            "<": lambda a, b: a < b,
            ">": lambda a, b: a > b,
            "<=": lambda a, b: a <= b,
            ">=": lambda a, b: a >= b,
            "&&": lambda a, b: bool(a and b),
            "||": lambda a, b: bool(a or b),
        }
        return ops[op](left, right)

    def _unary_op(self, tree: Tree) -> Any:
        op = str(tree.children[0])
        value = self.eval(_trees(tree.children)[0])
        if not is_known(value):
            return UNKNOWN
        return (not value) if op == "!" else -value

    def _function_call(self, tree: Tree) -> Any:
        nodes = _trees(tree.children)
        name = _token_text(nodes[0])
        if len(nodes) > 1 and isinstance(nodes[1], Tree) and nodes[1].data == "identifier":
            return UNKNOWN  # provider::x::y functions
        args_tree = next((n for n in nodes[1:] if n.data == "arguments"), None)
        arg_trees = _trees(args_tree.children) if args_tree is not None else []
        expand = args_tree is not None and any(isinstance(c, Token) and c.type == "ELLIPSIS" for c in args_tree.children)
        if name in ("try", "can"):
            return self._try(name, arg_trees)
        args = [self.eval(a) for a in arg_trees]
        if expand:
            last = args.pop()
            if not isinstance(last, list):
                return UNKNOWN
            args.extend(last)
        func = FUNCTIONS.get(name)
        if func is None:
            return UNKNOWN
        if name in SHALLOW:
            if any(a is UNKNOWN or isinstance(a, Partial) for a in args):
                return UNKNOWN
        elif name not in LENIENT and not all(is_known(a) for a in args):
            return UNKNOWN
        try:
            return func(*args)
        except (TypeError, ValueError, KeyError, IndexError) as err:
            raise EvalError(f"{self.instance.address}: {name}() failed: {err}") from err

    def _try(self, name: str, arg_trees: list[Tree]) -> Any:
        for arg in arg_trees:
            try:
                value = self.eval(arg)
            except EvalError:
                if name == "can":
                    return False
                continue
            return True if name == "can" else value
        if name == "can":
            return False
        raise EvalError(f"{self.instance.address}: no argument of try() could be evaluated")

    def _for(self, tree: Tree, is_object: bool) -> Any:
        nodes = _trees(tree.children)
        intro = nodes[0]
        names = [str(n.children[0]) for n in _trees(intro.children) if n.data == "identifier"]
        collection = self.eval(_trees(intro.children)[-1])
        if collection is UNKNOWN or not isinstance(collection, (list, dict)):
            return UNKNOWN
        cond = nodes[-1] if nodes[-1].data == "for_cond" else None
        body = nodes[1:-1] if cond is not None else nodes[1:]
        grouping = any(isinstance(c, Token) and c.type == "ELLIPSIS" for c in tree.children)
        if isinstance(collection, dict):
            pairs = [(k, collection[k]) for k in sorted(collection)]
        else:
            pairs = list(enumerate(collection))
        result_list: list[Any] = []
        result_obj: dict[str, Any] = {}
        for key, value in pairs:
            scope = dict(self.extra)
            if len(names) == 2:
                scope[names[0]], scope[names[1]] = key, value
            else:
                scope[names[0]] = value
            inner = Evaluator(self.instance, scope)
            if cond is not None:
                keep = inner.eval(_trees(cond.children)[0])
                if not isinstance(keep, bool):
                    return UNKNOWN
                if not keep:
                    continue
            if is_object:
                k = inner.eval(body[0])
                v = inner.eval(body[1])
                if not isinstance(k, str) or isinstance(k, Partial):
                    return UNKNOWN
                if grouping:
                    result_obj.setdefault(k, []).append(v)
                else:
                    result_obj[k] = v
            else:
                result_list.append(inner.eval(body[0]))
        return result_obj if is_object else result_list

    def _for_tuple_expr(self, tree: Tree) -> Any:
        return self._for(tree, False)

    def _for_object_expr(self, tree: Tree) -> Any:
        return self._for(tree, True)


def _get_attr(base: Any, name: str) -> Any:
    if base is UNKNOWN:
        return UNKNOWN
    if isinstance(base, _Namespace):
        return base.attr(name)
    if isinstance(base, dict):
        return base.get(name, UNKNOWN)
    if isinstance(base, list):
        raise EvalError(f"attribute .{name} of a list")
    return UNKNOWN


def _index(base: Any, key: Any) -> Any:
    if base is UNKNOWN or key is UNKNOWN or isinstance(key, Partial):
        return UNKNOWN
    if isinstance(base, _Namespace):
        return UNKNOWN  # an instance of a counted resource: computed
    if isinstance(base, dict):
        if not isinstance(key, str):
            key = _to_string(key)
        if key not in base:
            raise EvalError(f"no key {key!r} in map (keys: {sorted(base)})")
        return base[key]
    if isinstance(base, list):
        if isinstance(key, str) and key.isdigit():
            key = int(key)
        if not isinstance(key, int) or not 0 <= key < len(base):
            raise EvalError(f"index {key!r} out of range")
        return base[key]
    return UNKNOWN


def _to_string(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        raise EvalError("a list or map cannot be used as a string")
    return str(value)


def _set(values: Any) -> list:
    out: list = []
    for v in values:
        if v not in out:
            out.append(v)
    try:
        return sorted(out)
    except TypeError:
        return out


def _format(fmt: str, *args: Any) -> str:
    it = iter(args)

    def repl(m: re.Match) -> str:
        if m.group(0) == "%%":
            return "%"
        return _to_string(next(it)) if m.group(1) in "sdvq" else str(next(it))

    return re.sub(r"%%|%[-+ 0#]*\d*(?:\.\d+)?([a-zA-Z])", repl, fmt)


def _lookup(mapping: Any, key: Any, *default: Any) -> Any:
    if mapping is UNKNOWN or key is UNKNOWN:
        return UNKNOWN
    if isinstance(mapping, dict) and key in mapping:
        return mapping[key]
    if default:
        return default[0]
    raise KeyError(key)


def _coalesce(*args: Any) -> Any:
    for a in args:
        if a is UNKNOWN:
            return UNKNOWN
        if a is not None and a != "":
            return a
    raise ValueError("no non-null argument")


def _merge(*maps: Any) -> Any:
    out: dict = {}
    for m in maps:
        if m is UNKNOWN:
            return UNKNOWN
        if m is not None:
            out.update(m)
    return out


def _flatten(values: list) -> list:
    out: list = []
    for v in values:
        out.extend(_flatten(v) if isinstance(v, list) else [v])
    return out


def _one(values: list) -> Any:
    if len(values) > 1:
        raise ValueError("more than one element")
    return values[0] if values else None


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "abs": abs,
    "alltrue": lambda xs: all(xs),
    "anytrue": lambda xs: any(xs),
    "coalesce": _coalesce,
    "compact": lambda xs: [x for x in xs if x not in (None, "")],
    "concat": lambda *ls: [x for l in ls for x in l],
    "contains": lambda xs, v: v in xs,
    "distinct": lambda xs: [x for i, x in enumerate(xs) if x not in xs[:i]],
    "element": lambda xs, i: xs[i % len(xs)],
    "endswith": lambda s, x: s.endswith(x),
    "flatten": _flatten,
    "format": _format,
    "index": lambda xs, v: xs.index(v),
    "join": lambda sep, xs: sep.join(_to_string(x) for x in xs),
    "jsonencode": lambda v: json.dumps(v, separators=(",", ":")),
    "keys": lambda m: sorted(m),
    "length": len,
    "lookup": _lookup,
    "lower": str.lower,
    "max": max,
    "merge": _merge,
    "min": min,
    "one": _one,
    "range": lambda *a: list(range(*a)),
    "replace": lambda s, a, b: s.replace(a, b),
    "reverse": lambda xs: list(reversed(xs)),
    "setintersection": lambda a, *bs: _set(x for x in a if all(x in b for b in bs)),
    "setsubtract": lambda a, b: _set(x for x in a if x not in b),
    "setunion": lambda *ls: _set(x for l in ls for x in l),
    "slice": lambda xs, a, b: xs[a:b],
    "sort": lambda xs: sorted(xs),
    "split": lambda sep, s: s.split(sep),
    "startswith": lambda s, x: s.startswith(x),
    "substr": lambda s, off, n: s[off:] if n < 0 else s[off : off + n],
    "tolist": list,
    "tomap": dict,
    "tonumber": lambda v: float(v) if "." in str(v) else int(v),
    "toset": _set,
    "tostring": _to_string,
    "trimspace": str.strip,
    "upper": str.upper,
    "values": lambda m: [m[k] for k in sorted(m)],
    "zipmap": lambda ks, vs: dict(zip(ks, vs)),
}

# Functions that decide for themselves what to do with unknown arguments.
LENIENT = {"coalesce", "lookup", "merge"}
# Functions that need only the shape of their arguments, not every value.
SHALLOW = {"length", "keys", "slice", "concat", "element", "one", "flatten", "tolist", "tomap"}
