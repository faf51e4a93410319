#!/usr/bin/env bash
# image/test-publish.sh: runs image/publish-ami.sh --snapshot-id against a local moto server and
# checks the RegisterImage request it sent (moto records requests; it does not implement
# import-snapshot, so the upload/import steps are not exercised here).
# Needs moto_server (pip install 'moto[server,ec2]') and build/image/version from image/build.sh.
# The AWS CLI comes from a throwaway venv, build/awscli-venv (created on first use: pip install
# awscli, which needs the network once).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
port=${MOTO_PORT:-5123}
venv=build/awscli-venv
tmp=$(mktemp -d)
moto_pid=''
cleanup() {
    [[ -n $moto_pid ]] && kill "$moto_pid" 2>/dev/null && wait "$moto_pid" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT
fail() { echo "test-publish.sh: FAIL: $*" >&2; exit 1; }

command -v moto_server >/dev/null || fail "moto_server not found (pip install 'moto[server,ec2]')"
[[ -f build/image/version ]] || fail "no build/image/version: run image/build.sh first"
if [[ ! -x $venv/bin/aws ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet awscli
fi

MOTO_ENABLE_RECORDING=1 MOTO_RECORDER_FILEPATH=$tmp/recording moto_server -p "$port" >"$tmp/moto.log" 2>&1 &
moto_pid=$!
export PATH=$repo/$venv/bin:$PATH AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
endpoint=http://127.0.0.1:$port
for _ in $(seq 50); do
    curl -fsS "$endpoint/moto-api/" >/dev/null 2>&1 && break
    sleep 0.2
done
aws() { command aws --endpoint-url "$endpoint" "$@"; }

volume=$(aws ec2 create-volume --availability-zone us-east-1a --size 1 --query VolumeId --output text)
snapshot=$(aws ec2 create-snapshot --volume-id "$volume" --query SnapshotId --output text)

ami=$(image/publish-ami.sh --snapshot-id "$snapshot" --endpoint-url "$endpoint" --region us-east-1)
[[ $ami == ami-* ]] || fail "publish-ami.sh printed '$ami', not an AMI id"
name=$(aws ec2 describe-images --image-ids "$ami" --query 'Images[0].Name' --output text)
image_id=$(sed -n 's/^image_id=//p' build/image/version)
[[ $name == "spotinit-$image_id" ]] || fail "AMI $ami is named '$name'"
tag=$(aws ec2 describe-tags --filters "Name=resource-id,Values=$ami" "Name=key,Values=spotinit:image_id" \
    --query 'Tags[0].Value' --output text)
[[ $tag == "$image_id" ]] || fail "AMI $ami has spotinit:image_id tag '$tag'"

# The RegisterImage request as moto received it (form-encoded body, base64 in the recording).
request=$(python3 - "$tmp/recording" <<'EOF'
import base64, json, sys, urllib.parse
for line in open(sys.argv[1]):
    entry = json.loads(line)
    body = entry.get("body") or ""
    if entry.get("body_encoded"):
        body = base64.b64decode(body).decode()
    params = dict(urllib.parse.parse_qsl(body))
    if params.get("Action") == "RegisterImage":
        print("\n".join(f"{k}={v}" for k, v in sorted(params.items())))
EOF
)
for want in BootMode=uefi EnaSupport=true Architecture=x86_64 VirtualizationType=hvm ImdsSupport=v2.0 \
    RootDeviceName=/dev/xvda BlockDeviceMapping.1.DeviceName=/dev/xvda \
    "BlockDeviceMapping.1.Ebs.SnapshotId=$snapshot" BlockDeviceMapping.1.Ebs.VolumeType=gp3; do
    grep -qxF "$want" <<<"$request" || fail "RegisterImage request lacks $want; it was:"$'\n'"$request"
done
echo "test-publish.sh: ok: $ami registered from $snapshot with: $(grep -E '^(BootMode|EnaSupport|ImdsSupport|Architecture)=' <<<"$request" | tr '\n' ' ')"
