#!/usr/bin/env python3
"""Self-test of tests/hcleval.py, the evaluator behind the residency test.

Plain asserts (no test framework needed); exit status 0 when all pass.
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hcleval import UNKNOWN, EvalError, Instance, Partial, parse_expression  # noqa: E402

ROOT = """
variable "regions" {
  default = ["eu-west-1", "eu-central-1", "eu-north-1"]
}
variable "required" {}
locals {
  primary  = var.regions[0]
  others   = slice(var.regions, 1, length(var.regions))
  minus    = setsubtract(var.regions, [local.primary])
  upper    = [for r in var.regions : upper(r) if r != "eu-north-1"]
  by_name  = { for i, r in var.regions : r => i }
  grouped  = { for r in var.regions : substr(r, 0, 2) => r... }
  text     = "a-${local.primary}-${var.required}"
  plain    = "x-${local.primary}"
  cond     = length(var.regions) > 2 ? "many" : "few"
  unknown  = var.required == "x" ? 1 : 2
  objs     = [{ n = "a" }, { n = "b" }]
  splat    = local.objs[*].n
  fmt      = format("%s/%d", "k", 7)
  merged   = merge({ a = 1 }, { b = 2 })
  looked   = lookup({ a = 1 }, "z", 9)
  escaped  = "q\\"x$${y}"
  math     = 2 + 3 * 4 - 10 / 5
  logic    = !false && (true || false)
  tried    = try(local.objs[5].n, "fallback")
}
provider "aws" {
  alias  = "a"
  region = "eu-west-1"
}
module "child" {
  source    = "./child"
  providers = { aws = aws.a }
  names     = var.regions
}
"""

CHILD = """
variable "names" {}
data "aws_region" "here" {}
locals {
  region = data.aws_region.here.name
}
resource "aws_s3_bucket" "b" {
  count  = 2
  bucket = "b-${count.index}-${local.region}"
}
resource "aws_dynamodb_table" "t" {
  name = "t"
  dynamic "replica" {
    for_each = setsubtract(var.names, [local.region])
    content {
      region_name = replica.value
    }
  }
}
output "region" {
  value = local.region
}
output "bucket" {
  value = aws_s3_bucket.b[0].bucket
}
"""


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "child"))
        with open(os.path.join(tmp, "main.tf"), "w") as handle:
            handle.write(ROOT)
        with open(os.path.join(tmp, "child", "main.tf"), "w") as handle:
            handle.write(CHILD)
        root = Instance.root(tmp)
        local = root.local
        assert local("primary") == "eu-west-1"
        assert local("others") == ["eu-central-1", "eu-north-1"]
        assert local("minus") == ["eu-central-1", "eu-north-1"]
        assert local("upper") == ["EU-WEST-1", "EU-CENTRAL-1"]
        assert local("by_name") == {"eu-west-1": 0, "eu-central-1": 1, "eu-north-1": 2}
        assert local("grouped") == {"eu": ["eu-west-1", "eu-central-1", "eu-north-1"]}
        assert isinstance(local("text"), Partial) and local("text").startswith("a-eu-west-1-")
        assert local("plain") == "x-eu-west-1" and not isinstance(local("plain"), Partial)
        assert local("cond") == "many"
        assert local("unknown") is UNKNOWN
        assert local("splat") == ["a", "b"]
        assert local("fmt") == "k/7"
        assert local("merged") == {"a": 1, "b": 2}
        assert local("looked") == 9
        assert local("escaped") == 'q"x${y}', local("escaped")
        assert local("math") == 12
        assert local("logic") is True
        assert local("tried") == "fallback"

        child = root.child("child")
        assert child.providers == {"aws": "eu-west-1"}
        assert root.eval(parse_expression("module.child.region")) == "eu-west-1"
        # A counted resource's attributes are computed: unknown, never guessed.
        assert root.eval(parse_expression("module.child.bucket")) is UNKNOWN
        bucket = child.config.resource("aws_s3_bucket", "b")
        scopes = child.expand(bucket)
        names = [child.eval(bucket.attrs["bucket"], s) for s in scopes]
        assert names == ["b-0-eu-west-1", "b-1-eu-west-1"], names
        table = child.config.resource("aws_dynamodb_table", "t")
        replicas = [child.eval(b.attrs["region_name"], s) for b, s in child.nested(table, "replica", {})]
        assert replicas == ["eu-central-1", "eu-north-1"], replicas

        try:
            local("missing")
        except EvalError:
            pass
        else:
            raise AssertionError("an undeclared local must be an error")
    print("hcleval self-test: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
