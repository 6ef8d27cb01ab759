#!/usr/bin/env python3
"""Residency policy test for Meridian's Terraform configurations.

Usage: residency.py CONFIG_DIR [--map-variable jurisdictions]

Reads the root module in CONFIG_DIR (and every local module it calls), takes
the jurisdiction -> regions map from the root variable named by
--map-variable (its default, or terraform.tfvars), and checks that

  * no region belongs to two jurisdictions;
  * every resource of a module instance that belongs to a jurisdiction (a
    module called with `jurisdiction = ...`, and everything it calls) is
    created in one of that jurisdiction's regions;
  * every DynamoDB table's region and replica regions lie in its
    jurisdiction's regions (for Meridian's tables: are exactly those regions),
    and a table named meridian-changes-<j> belongs to jurisdiction <j>;
  * every S3 bucket lies in its jurisdiction's regions, and a bucket named
    meridian-snapshots-<j>-<region>... really is in <region> of <j>;
  * every S3 replication destination is a bucket of this configuration, of the
    same jurisdiction, in one of its regions; and in a jurisdiction with more
    than one region each bucket replicates to every other region's bucket;
  * every cell (a module with durable_table and durable_bucket) uses its own
    jurisdiction's table, which has a replica in the cell's region, and its
    own jurisdiction's bucket in the cell's region.

A value the test cannot determine (UNKNOWN) where residency depends on it is a
failure: the test never guesses.

Exit status: 0 when every check passes, 1 on a residency violation, 2 when the
configuration cannot be evaluated.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hcleval import UNKNOWN_MARK, EvalError, Instance, Partial, is_known  # noqa: E402

CHANGE_TABLE = re.compile(r"^meridian-changes-(?P<j>[a-z0-9]+)$")
SNAPSHOT_BUCKET = re.compile(r"^meridian-snapshots-(?P<j>[a-z0-9]+)-(?P<region>[a-z]{2}(?:-gov)?-[a-z]+-\d)")
BUCKET_ARN = re.compile(r":s3:::(?P<name>[^/:\x00]+)$")

# Resources that exist once per account rather than per region.
GLOBAL_TYPES = {
    "aws_iam_role",
    "aws_iam_role_policy",
    "aws_iam_role_policy_attachment",
    "aws_iam_policy",
    "aws_iam_instance_profile",
    "aws_route53_record",
    "aws_route53_health_check",
}


@dataclass
class Table:
    name: str
    jurisdiction: str
    regions: list[str]
    where: str


@dataclass
class Bucket:
    name: str
    jurisdiction: str
    region: str
    where: str


@dataclass
class Replication:
    source: str
    jurisdiction: str
    destinations: list[str]
    where: str


@dataclass
class Cell:
    address: str
    jurisdiction: str
    region: str
    table: Any
    bucket: Any


@dataclass
class Report:
    violations: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.violations.append(message)

    def ok(self, message: str) -> None:
        self.checked.append(message)


def show(value: Any) -> str:
    if isinstance(value, Partial):
        return repr(str(value).replace(UNKNOWN_MARK, "<unknown>"))
    return repr(value)


class Checker:
    def __init__(self, root: Instance, jurisdictions: dict[str, list[str]]):
        self.root = root
        self.jurisdictions = jurisdictions
        self.report = Report()
        self.tables: list[Table] = []
        self.buckets: list[Bucket] = []
        self.replications: list[Replication] = []
        self.cells: list[Cell] = []

    # -- collection -----------------------------------------------------------

    def run(self) -> Report:
        self.check_map()
        self.walk(self.root, None)
        self.check_replication()
        self.check_cells()
        return self.report

    def check_map(self) -> None:
        owner: dict[str, str] = {}
        for j, regions in sorted(self.jurisdictions.items()):
            for region in regions:
                if region in owner:
                    self.report.fail(f"region {region} is in two jurisdictions: {owner[region]} and {j}")
                owner[region] = j
        self.report.ok(f"jurisdiction map: {', '.join(f'{j}={regions}' for j, regions in sorted(self.jurisdictions.items()))}")

    def jurisdiction_of(self, inst: Instance, inherited: Optional[str]) -> Optional[str]:
        if "jurisdiction" not in inst.config.variables:
            return inherited
        value = inst.var("jurisdiction")
        if not isinstance(value, str) or not is_known(value):
            raise EvalError(f"{inst.address}: var.jurisdiction is not known ({show(value)})")
        if value not in self.jurisdictions:
            self.report.fail(f"{inst.address}: jurisdiction {value!r} is not in the jurisdiction map")
        if inherited is not None and value != inherited:
            self.report.fail(f"{inst.address}: jurisdiction {value!r} inside a module of jurisdiction {inherited!r}")
        return value

    def walk(self, inst: Instance, inherited: Optional[str]) -> None:
        j = self.jurisdiction_of(inst, inherited)
        for block in inst.config.resources:
            self.resource(inst, j, block)
        if j is not None and {"durable_table", "durable_bucket"} <= set(inst.config.variables):
            self.cells.append(
                Cell(inst.address, j, self.region(inst, None), inst.var("durable_table"), inst.var("durable_bucket"))
            )
        for child in inst.children():
            self.walk(child, j)

    def region(self, inst: Instance, block) -> str:
        value = inst.provider_region(block)
        if not isinstance(value, str) or not is_known(value):
            what = inst.address if block is None else f"{inst.address}.{'.'.join(block.labels)}"
            raise EvalError(f"{what}: region is not known ({show(value)}); configure the provider's region")
        return value

    def allowed(self, j: str) -> list[str]:
        return self.jurisdictions.get(j, [])

    def resource(self, inst: Instance, j: Optional[str], block) -> None:
        rtype, name = block.labels
        where = f"{inst.address}.{rtype}.{name}"
        data_store = rtype in ("aws_dynamodb_table", "aws_s3_bucket", "aws_dynamodb_table_replica")
        if j is None:
            if data_store:
                self.report.fail(f"{where}: a data store outside any jurisdiction module")
            return
        scopes = inst.expand(block)
        if not scopes:
            return
        region = self.region(inst, block)
        if rtype not in GLOBAL_TYPES and region not in self.allowed(j):
            self.report.fail(f"{where}: created in {region}, outside jurisdiction {j} {self.allowed(j)}")
        for scope in scopes:
            if rtype == "aws_dynamodb_table":
                self.table(inst, j, block, scope, region, where)
            elif rtype == "aws_dynamodb_table_replica":
                self.report.ok(f"{where}: replica in {region}")
            elif rtype == "aws_s3_bucket":
                self.bucket(inst, j, block, scope, region, where)
            elif rtype == "aws_s3_bucket_replication_configuration":
                self.replication(inst, j, block, scope, where)

    def known_string(self, inst: Instance, expr, scope, what: str) -> str:
        value = inst.eval(expr, scope)
        if not isinstance(value, str) or not is_known(value):
            raise EvalError(f"{what} is not known ({show(value)})")
        return value

    def table(self, inst, j, block, scope, region, where) -> None:
        name = self.known_string(inst, block.attrs["name"], scope, f"{where}: name")
        regions = [region]
        for replica, rscope in inst.nested(block, "replica", scope):
            regions.append(self.known_string(inst, replica.attrs["region_name"], rscope, f"{where}: replica region"))
        match = CHANGE_TABLE.match(name)
        if match and match.group("j") != j:
            self.report.fail(f"{where}: table {name} is managed by jurisdiction {j}")
        outside = [r for r in regions if r not in self.allowed(j)]
        missing = [r for r in self.allowed(j) if r not in regions]
        if outside:
            self.report.fail(f"{where}: table {name} of {j} has replicas in {outside}, outside {self.allowed(j)}")
        elif missing and name.startswith("meridian-"):
            self.report.fail(f"{where}: table {name} of {j} has no replica in {missing}; its replicas must be exactly {self.allowed(j)}")
        else:
            self.report.ok(f"table {name} ({j}) in {regions}")
        self.tables.append(Table(name, j, regions, where))

    def bucket(self, inst, j, block, scope, region, where) -> None:
        name = self.known_string(inst, block.attrs["bucket"], scope, f"{where}: bucket name")
        match = SNAPSHOT_BUCKET.match(name)
        if match and (match.group("j") != j or match.group("region") != region):
            self.report.fail(f"{where}: bucket {name} is in {region} of jurisdiction {j}, not as its name says")
        if region in self.allowed(j):
            self.report.ok(f"bucket {name} ({j}) in {region}")
        self.buckets.append(Bucket(name, j, region, where))

    def replication(self, inst, j, block, scope, where) -> None:
        source = self.known_string(inst, block.attrs["bucket"], scope, f"{where}: source bucket")
        destinations = []
        for rule, rscope in inst.nested(block, "rule", scope):
            for dest, dscope in inst.nested(rule, "destination", rscope):
                arn = inst.eval(dest.attrs["bucket"], dscope)
                match = BUCKET_ARN.search(str(arn)) if isinstance(arn, str) else None
                if match is None:
                    raise EvalError(f"{where}: replication destination is not known ({show(arn)})")
                destinations.append(match.group("name"))
        self.replications.append(Replication(source, j, destinations, where))

    # -- cross-resource checks ------------------------------------------------

    def check_replication(self) -> None:
        by_name = {b.name: b for b in self.buckets}
        sources = {}
        for rep in self.replications:
            src = by_name.get(rep.source)
            if src is None:
                self.report.fail(f"{rep.where}: source bucket {rep.source} is not created by this configuration")
                continue
            sources[src.name] = rep
            for name in rep.destinations:
                dest = by_name.get(name)
                if dest is None:
                    self.report.fail(f"{rep.where}: destination {name} is not a bucket of this configuration; its region cannot be checked")
                elif dest.jurisdiction != rep.jurisdiction or dest.region not in self.allowed(rep.jurisdiction):
                    self.report.fail(
                        f"{rep.where}: {rep.jurisdiction} bucket {rep.source} replicates to {name} "
                        f"({dest.jurisdiction}, {dest.region}), outside {self.allowed(rep.jurisdiction)}"
                    )
                elif dest.region == src.region:
                    self.report.fail(f"{rep.where}: {rep.source} replicates to {name} in its own region")
                else:
                    self.report.ok(f"replication {rep.source} -> {name} stays in {rep.jurisdiction}")
        # Each bucket of a multi-region jurisdiction replicates to every other region.
        for bucket in self.buckets:
            peers = {b.name for b in self.buckets if b.jurisdiction == bucket.jurisdiction and b.region != bucket.region}
            if not peers:
                continue
            rep = sources.get(bucket.name)
            missing = sorted(peers - set(rep.destinations if rep else []))
            if missing:
                self.report.fail(f"{bucket.where}: bucket {bucket.name} does not replicate to {missing}")

    def check_cells(self) -> None:
        tables = {t.name: t for t in self.tables}
        buckets = {b.name: b for b in self.buckets}
        for cell in self.cells:
            if cell.region not in self.allowed(cell.jurisdiction):
                self.report.fail(f"{cell.address}: cell in {cell.region}, outside {cell.jurisdiction} {self.allowed(cell.jurisdiction)}")
            table = tables.get(cell.table) if isinstance(cell.table, str) and is_known(cell.table) else None
            bucket = buckets.get(cell.bucket) if isinstance(cell.bucket, str) and is_known(cell.bucket) else None
            if table is None:
                self.report.fail(f"{cell.address}: durable table {show(cell.table)} is not a table of this configuration")
            elif table.jurisdiction != cell.jurisdiction or cell.region not in table.regions:
                self.report.fail(f"{cell.address}: {cell.jurisdiction} cell in {cell.region} uses table {table.name} ({table.jurisdiction}, {table.regions})")
            if bucket is None:
                self.report.fail(f"{cell.address}: durable bucket {show(cell.bucket)} is not a bucket of this configuration")
            elif bucket.jurisdiction != cell.jurisdiction or bucket.region != cell.region:
                self.report.fail(f"{cell.address}: {cell.jurisdiction} cell in {cell.region} uses bucket {bucket.name} ({bucket.jurisdiction}, {bucket.region})")
            if table is not None and bucket is not None:
                self.report.ok(f"cell {cell.address} ({cell.jurisdiction}, {cell.region}) uses {table.name} and {bucket.name}")


def load_map(root: Instance, variable: str) -> dict[str, list[str]]:
    if variable not in root.config.variables:
        raise EvalError(f"the root module has no variable {variable!r} (the jurisdiction map)")
    value = root.var(variable)
    if not isinstance(value, dict) or not is_known(value):
        raise EvalError(f"var.{variable} is not a known map ({show(value)})")
    result = {}
    for j, regions in value.items():
        if isinstance(regions, dict):
            regions = regions.get("regions")
        if not isinstance(regions, list) or not all(isinstance(r, str) for r in regions) or not regions:
            raise EvalError(f"var.{variable}[{j!r}] must be a non-empty list of regions")
        result[j] = regions
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config_dir")
    parser.add_argument("--map-variable", default="jurisdictions")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        root = Instance.root(args.config_dir)
        report = Checker(root, load_map(root, args.map_variable)).run()
    except EvalError as err:
        print(f"residency: cannot evaluate {args.config_dir}: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a bug or an unexpected construct: never a verdict
        print(f"residency: internal error on {args.config_dir}: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    if args.verbose:
        for line in report.checked:
            print(f"  ok: {line}")
    for line in report.violations:
        print(f"  VIOLATION: {line}")
    verdict = "FAIL" if report.violations else "ok"
    print(f"residency {verdict}: {args.config_dir}: {len(report.checked)} facts checked, {len(report.violations)} violations")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
