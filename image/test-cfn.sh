#!/usr/bin/env bash
# image/test-cfn.sh [TEMPLATE]: checks image/cloudformation.yaml (or TEMPLATE).
#   1. cfn-lint (PyPI) passes with no error and no warning. cfn-lint comes from a throwaway venv,
#      build/cfn-venv (created on first use: pip install cfn-lint, which needs the network once).
#   2. The safety properties are still there, read from the parsed template (not from its text):
#      IMDSv2 required with hop limit 1 and metadata tags off, capacity rebalancing, a group of
#      InstanceCount (no more instances than volumes) that is 100 % spot
#      (price-capacity-optimized), and the AssociateAddress statement only when an Elastic IP is
#      given. With a pool (PoolName): pool and pool_max in the user data's [volume], every
#      statement of the role on the state volume also scoped by spotinit:pool, and DeleteVolume
#      on the pool's volumes; without one, no pool anywhere. The template's Rules refuse
#      InstanceCount above 1 without a pool, or with an Elastic IP.
#   3. The user data the template renders (with the default parameters, with an Elastic IP, with
#      Service=gitlab, which also opens GitLab's ports and moves spotinit's SSH to 2222, and with
#      a pool of 3) passes `spotinit config check`, when a spotinit binary has been built.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
template=${1:-image/cloudformation.yaml}   # an argument: check another copy of it
venv=build/cfn-venv
spotinit=${SPOTINIT_BIN:-${CARGO_TARGET_DIR:-target}/release/spotinit}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "test-cfn.sh: FAIL: $*" >&2; exit 1; }

if [[ ! -x $venv/bin/cfn-lint ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet cfn-lint
fi

# 1. cfn-lint: errors and warnings both fail (informational findings are not printed by default).
if ! "$venv/bin/cfn-lint" --format parseable -- "$template" >"$tmp/lint" 2>&1; then
    fail "cfn-lint $("$venv/bin/cfn-lint" --version) found problems in $template:"$'\n'"$(cat "$tmp/lint")"
fi
[[ ! -s $tmp/lint ]] || fail "cfn-lint printed:"$'\n'"$(cat "$tmp/lint")"

# 2 and 3. A small evaluator of the intrinsic functions the template uses, so the checks see what
# CloudFormation would deploy for a given set of parameters.
"$venv/bin/python" - "$template" "$tmp" <<'EOF' || fail "the template lost a safety property (above)"
import sys, yaml

path, out = sys.argv[1], sys.argv[2]

class Loader(yaml.SafeLoader):
    pass

def tag(loader, suffix, node):
    name = "Ref" if suffix == "Ref" else ("Fn::GetAtt" if suffix == "GetAtt" else "Fn::" + suffix)
    if suffix == "Condition":
        name = "Condition"
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {name: value}

Loader.add_multi_constructor("!", tag)
t = yaml.load(open(path), Loader=Loader)
problems = []

def check(ok, what):
    if not ok:
        problems.append(what)

NOVALUE = object()

def render(params):
    """The resources CloudFormation would create for params, and the AssertDescription of each of
    the template's Rules assertions that refuses params."""
    values = {k: str(v.get("Default", "")) for k, v in t["Parameters"].items()}
    values.update(params)
    values.update({"AWS::StackName": "spotinit", "AWS::Region": "eu-west-1",
                   "AWS::AccountId": "123456789012", "AWS::Partition": "aws"})
    lists = {k for k, v in t["Parameters"].items() if v["Type"].startswith(("List<", "CommaDelimitedList"))}
    conditions = {}

    def ev(x):
        if isinstance(x, list):
            return [y for y in (ev(i) for i in x) if y is not NOVALUE]
        if not isinstance(x, dict):
            return x
        if len(x) == 1:
            (k, v), = x.items()
            if k == "Ref":
                if v == "AWS::NoValue":
                    return NOVALUE
                if v in values:
                    return values[v].split(",") if v in lists else values[v]
                return "ref-" + v
            if k == "Fn::GetAtt":
                return "getatt-" + ".".join(v)
            if k == "Fn::Sub":
                text, extra = (v, {}) if isinstance(v, str) else (v[0], {a: ev(b) for a, b in v[1].items()})
                for name, value in {**values, **extra}.items():
                    text = text.replace("${" + name + "}", str(value))
                return text
            if k == "Fn::If":
                return ev(v[1] if cond(v[0]) else v[2])
            if k == "Fn::Join":
                return v[0].join(str(i) for i in ev(v[1]))
            if k == "Fn::Split":
                return ev(v[1]).split(v[0])
            if k == "Fn::Select":
                return ev(v[1])[int(v[0])]
            if k == "Fn::Equals":
                return ev(v[0]) == ev(v[1])
            if k == "Fn::Not":
                return not ev(v[0])
            if k == "Fn::And":
                return all(ev(i) for i in v)
            if k == "Condition":
                return cond(v)
            if k == "Fn::Base64":
                return ev(v)
        return {k: y for k, y in ((k, ev(v)) for k, v in x.items()) if y is not NOVALUE}

    def cond(name):
        if name not in conditions:
            conditions[name] = bool(ev(t["Conditions"][name]))
        return conditions[name]

    refused = [a["AssertDescription"] for rule in t.get("Rules", {}).values()
               if ev(rule.get("RuleCondition", True))
               for a in rule["Assertions"] if not ev(a["Assert"])]
    return {name: ev(r) for name, r in t["Resources"].items()}, refused

def of_type(resources, kind):
    found = [r for r in resources.values() if r["Type"] == kind]
    check(len(found) == 1, f"expected exactly one {kind}, found {len(found)}")
    return found[0] if found else {"Properties": {}}

def string_equals(statement):
    return statement.get("Condition", {}).get("StringEquals", {})

gitlab = {"Service": "gitlab", "GitLabExternalUrl": "https://gitlab.example.com",
          "KeyName": "my-key", "AllowedCidr": "203.0.113.0/24",
          "NotifyWebhookUrl": "https://hooks.slack.com/services/T000/B000/XXXX"}
pool = {"PoolName": "runners", "InstanceCount": "3"}
for name, label, params, eip in [("defaults", "defaults", {}, None),
                                 ("eip", "with an Elastic IP", {"ElasticIpAllocationId": "eipalloc-0123456789abcdef0"},
                                  "eipalloc-0123456789abcdef0"),
                                 ("gitlab", "with GitLab", gitlab, None),
                                 ("pool", "with a pool of 3", pool, None)]:
    res, refused = render(params)
    check(not refused, f"{label}: refused by the template's Rules: {refused}")
    lt = of_type(res, "AWS::EC2::LaunchTemplate")["Properties"].get("LaunchTemplateData", {})
    md = lt.get("MetadataOptions", {})
    check(md.get("HttpTokens") == "required", f"{label}: MetadataOptions.HttpTokens is not 'required' (IMDSv2 only)")
    check(md.get("HttpPutResponseHopLimit") == 1, f"{label}: MetadataOptions.HttpPutResponseHopLimit is not 1")
    check(md.get("HttpEndpoint") == "enabled", f"{label}: MetadataOptions.HttpEndpoint is not 'enabled' (spotinit needs IMDS)")
    check(md.get("InstanceMetadataTags") == "disabled", f"{label}: MetadataOptions.InstanceMetadataTags is not 'disabled'")
    check(lt.get("EbsOptimized") is True, f"{label}: the launch template is not EbsOptimized")
    asg = of_type(res, "AWS::AutoScaling::AutoScalingGroup")["Properties"]
    check(asg.get("CapacityRebalance") is True, f"{label}: the group's CapacityRebalance is not true")
    count = params.get("InstanceCount", "1")
    sizes = [str(asg.get(k)) for k in ("MinSize", "MaxSize", "DesiredCapacity")]
    check(sizes == [count] * 3,
          f"{label}: the group's MinSize, MaxSize, DesiredCapacity are {sizes}, not InstanceCount {count} (no more instances than volumes)")
    dist = asg.get("MixedInstancesPolicy", {}).get("InstancesDistribution", {})
    check(dist.get("OnDemandBaseCapacity") == 0 and dist.get("OnDemandPercentageAboveBaseCapacity") == 0,
          f"{label}: the group is not 100 % spot")
    check(dist.get("SpotAllocationStrategy") == "price-capacity-optimized",
          f"{label}: SpotAllocationStrategy is not price-capacity-optimized")
    types = [o.get("InstanceType") for o in asg.get("MixedInstancesPolicy", {}).get("LaunchTemplate", {}).get("Overrides", [])]
    want = t["Parameters"]["InstanceTypes"]["Default"].split(",")
    check(types == want, f"{label}: the overrides are {types}, not the InstanceTypes {want}")
    role = of_type(res, "AWS::IAM::Role")["Properties"]
    statements = [s for p in role.get("Policies", []) for s in p["PolicyDocument"]["Statement"]]
    associate = [s for s in statements if "ec2:AssociateAddress" in str(s.get("Action"))]
    if eip:
        check(len(associate) == 1 and any(r.endswith("elastic-ip/" + eip) for r in associate[0]["Resource"]),
              f"{label}: the role cannot associate {eip}")
    else:
        check(not associate, f"{label}: the role may associate addresses without an Elastic IP given")
    check(not any(s.get("Action") == "*" or s.get("Action") == "ec2:*" for s in statements),
          f"{label}: a statement grants every action")
    # The statements on the state volume are those scoped by its Name tag.
    by_name = [s for s in statements if any(k.endswith("Tag/Name") for k in string_equals(s))]
    deletes = [s for s in statements if "ec2:DeleteVolume" in str(s.get("Action"))]
    user_data = lt.get("UserData", "")
    volume_section = user_data.split("[volume]\n", 1)[-1].split("\n\n", 1)[0]
    if params is pool:
        for s in by_name:
            tag = next(k for k in string_equals(s) if k.endswith("Tag/Name")).replace("/Name", "/spotinit:pool")
            check(string_equals(s).get(tag) == "runners",
                  f"{label}: {s.get('Sid')} is not scoped by {tag} = runners")
        granted = {a for s in by_name for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
        for action in ["ec2:CreateVolume", "ec2:AttachVolume", "ec2:DetachVolume", "ec2:ModifyVolume", "ec2:DeleteVolume"]:
            check(action in granted, f"{label}: the role has no {action} on the pool's volumes")
        check(all(s in by_name or "spotinit:superseded-by" in str(s.get("Condition")) for s in deletes),
              f"{label}: the role may delete volumes neither of the pool nor tagged superseded")
        check(all(s.get("Condition", {}).get("Null", {}).get("aws:ResourceTag/spotinit:format") == "true"
                  for s in deletes if s in by_name),
              f"{label}: the role may delete pool volumes that were formatted (not only a creation race's blank loser)")
        check('pool = "runners"' in volume_section and "pool_max = 3" in volume_section,
              f"{label}: the user data's [volume] lacks pool = \"runners\" or pool_max = 3:\n{volume_section}")
    else:
        check("spotinit:pool" not in str(statements), f"{label}: the role names a pool without PoolName")
        check(all("spotinit:superseded-by" in str(s.get("Condition")) for s in deletes),
              f"{label}: the role may delete volumes not tagged superseded")
        check("pool" not in volume_section, f"{label}: the user data's [volume] names a pool without PoolName")
    ingress = of_type(res, "AWS::EC2::SecurityGroup")["Properties"].get("SecurityGroupIngress", [])
    ports = sorted(int(r["FromPort"]) for r in ingress)
    if params is gitlab:
        check('[[containers]]' in user_data and 'name = "gitlab"' in user_data,
              f"{label}: the user data declares no GitLab")
        check("external_url 'https://gitlab.example.com'" in user_data, f"{label}: external_url missing")
        check("[ssh]\nport = 2222" in user_data, f"{label}: spotinit's SSH is not moved to 2222")
        check('[notify]\nwebhook_url = "https://hooks.slack.com/services/T000/B000/XXXX"' in user_data,
              f"{label}: the webhook is not in the user data")
        check(ports == [22, 80, 443, 2222], f"{label}: the security group opens {ports}, not 22, 80, 443, 2222")
    else:
        check("[[containers]]" not in user_data, f"{label}: the user data declares containers")
        check("[notify]" not in user_data, f"{label}: a [notify] section without a webhook")
    check("drain_before_retirement = true" in user_data, f"{label}: retirements are not drained ahead")
    with open(f"{out}/user-data-{name}.toml", "w") as f:
        f.write(user_data)

# The Rules: several instances need a pool, and an Elastic IP one instance; a pool of one is fine.
for label, params, refusing in [
        ("2 instances without a pool", {"InstanceCount": "2"}, "PoolName"),
        ("2 instances of a pool with an Elastic IP",
         {"InstanceCount": "2", "PoolName": "runners", "ElasticIpAllocationId": "eipalloc-0123456789abcdef0"},
         "ElasticIpAllocationId"),
        ("a pool of 1 with an Elastic IP", {"PoolName": "solo", "ElasticIpAllocationId": "eipalloc-0123456789abcdef0"},
         None)]:
    _, refused = render(params)
    if refusing:
        check(any(refusing in r for r in refused), f"{label}: not refused by the template's Rules")
    else:
        check(not refused, f"{label}: refused by the template's Rules: {refused}")

for p in problems:
    print("test-cfn.sh:", p, file=sys.stderr)
sys.exit(1 if problems else 0)
EOF

checked="skipped the user data check: no $spotinit (cargo build --release -p spotinit)"
if [[ -x $spotinit ]]; then
    for f in "$tmp"/user-data-*.toml; do
        "$spotinit" config check "$f" >"$tmp/check" 2>&1 || fail "the template's user data does not pass spotinit config check:"$'\n'"$(cat "$tmp/check")"$'\n'"--- $f:"$'\n'"$(cat "$f")"
    done
    checked="user data passes spotinit config check ($(sed 's/^[^:]*: ok: //' "$tmp/check"))"
fi
echo "test-cfn.sh: ok: cfn-lint $("$venv/bin/cfn-lint" --version | awk '{print $2}') clean; IMDSv2 required, hop limit 1, capacity rebalancing, 100 % spot; InstanceCount > 1 only with a pool, the pool's role scoped by spotinit:pool; $checked"
