#!/usr/bin/env bash
# image/publish-ami.sh --bucket BUCKET [options]: turns build/image/spotinit.raw into an AMI and
# prints its id (the only thing written to stdout; progress goes to stderr).
#
#   1. aws s3 cp spotinit.raw s3://BUCKET/PREFIX/IMAGE_ID.raw
#   2. aws ec2 import-snapshot (format RAW, from that object; EC2 reads it through the "vmimport"
#      service role), then poll describe-import-snapshot-tasks until the snapshot is completed
#   3. aws ec2 register-image --boot-mode uefi --ena-support --architecture x86_64
#      --virtualization-type hvm --imds-support v2.0 --root-device-name /dev/xvda
#   4. aws ec2 create-tags on the snapshot and the AMI; delete the uploaded object
#
# Options:
#   --bucket BUCKET        S3 bucket for the upload (same region; readable by the vmimport role)
#   --prefix PREFIX        key prefix in the bucket (default: spotinit)
#   --name NAME            AMI name (default: spotinit-IMAGE_ID; AMI names are unique per region)
#   --region REGION        AWS region (default: the CLI's configuration / AWS_REGION)
#   --endpoint-url URL     send every AWS call to URL (e.g. a local moto server); the AWS CLI also
#                          honours AWS_ENDPOINT_URL by itself
#   --snapshot-id SNAP     skip steps 1-2 and register SNAP (an already imported snapshot)
#   --keep-upload          keep the uploaded object in S3
#   --image-dir DIR        where spotinit.raw and version are (default: build/image)
# Needs the AWS CLI (v2, or v1 >= 1.29) and the IAM permissions listed in image/README.md.
set -euo pipefail

die() { echo "publish-ami.sh: error: $*" >&2; exit 1; }
log() { echo "publish-ami.sh: $*" >&2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
image_dir=$repo/build/image
bucket='' prefix=spotinit name='' snapshot='' keep_upload=0
aws_args=()
while (($#)); do
    case $1 in
    --bucket) bucket=${2:?--bucket needs a value}; shift ;;
    --prefix) prefix=${2:?--prefix needs a value}; shift ;;
    --name) name=${2:?--name needs a value}; shift ;;
    --region) aws_args+=(--region "${2:?--region needs a value}"); shift ;;
    --endpoint-url) aws_args+=(--endpoint-url "${2:?--endpoint-url needs a value}"); shift ;;
    --snapshot-id) snapshot=${2:?--snapshot-id needs a value}; shift ;;
    --keep-upload) keep_upload=1 ;;
    --image-dir) image_dir=${2:?--image-dir needs a value}; shift ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done

command -v aws >/dev/null || die "the AWS CLI (aws) is not installed"
[[ -f $image_dir/version ]] || die "no $image_dir/version: run image/build.sh first"
aws() { command aws "${aws_args[@]}" "$@"; }

# key=value from the version stamp
stamp() { sed -n "s/^$1=//p" "$image_dir/version"; }
image_id=$(stamp image_id)
[[ -n $image_id ]] || die "no image_id in $image_dir/version"
name=${name:-spotinit-$image_id}
description="spotinit $(stamp spotinit_version) ($(stamp git_commit)), Debian 13, kernel $(stamp kernel), docker $(stamp docker)"

if [[ -z $snapshot ]]; then
    [[ -n $bucket ]] || die "--bucket is required (or --snapshot-id to register an existing snapshot)"
    raw=$image_dir/spotinit.raw
    [[ -f $raw ]] || die "no $raw: run image/build.sh first"
    key=$prefix/$image_id.raw

    log "uploading $raw to s3://$bucket/$key"
    aws s3 cp --only-show-errors "$raw" "s3://$bucket/$key" >&2

    log "importing s3://$bucket/$key as an EBS snapshot"
    task=$(aws ec2 import-snapshot --description "$name" \
        --disk-container "Format=RAW,UserBucket={S3Bucket=$bucket,S3Key=$key}" \
        --query ImportTaskId --output text)
    deadline=$((SECONDS + 3600))
    while :; do
        read -r status snapshot progress < <(aws ec2 describe-import-snapshot-tasks --import-task-ids "$task" \
            --query 'ImportSnapshotTasks[0].SnapshotTaskDetail.[Status,SnapshotId,Progress]' --output text)
        case $status in
        completed) break ;;
        active) log "import $task: ${progress/None/0}%" ;;
        *)
            message=$(aws ec2 describe-import-snapshot-tasks --import-task-ids "$task" \
                --query 'ImportSnapshotTasks[0].SnapshotTaskDetail.StatusMessage' --output text)
            die "import $task ended as '$status': $message"
            ;;
        esac
        ((SECONDS < deadline)) || die "import $task still $status after an hour"
        sleep 15
    done
    aws ec2 wait snapshot-completed --snapshot-ids "$snapshot"
    log "snapshot $snapshot completed"
    if ((!keep_upload)); then
        aws s3 rm --only-show-errors "s3://$bucket/$key" >&2
    fi
fi

log "registering $name from $snapshot"
ami=$(aws ec2 register-image --name "$name" --description "$description" \
    --boot-mode uefi --ena-support --architecture x86_64 --virtualization-type hvm \
    --imds-support v2.0 --root-device-name /dev/xvda \
    --block-device-mappings "DeviceName=/dev/xvda,Ebs={SnapshotId=$snapshot,VolumeType=gp3,DeleteOnTermination=true}" \
    --query ImageId --output text)
aws ec2 create-tags --resources "$ami" "$snapshot" \
    --tags "Key=Name,Value=$name" "Key=spotinit:image_id,Value=$image_id" \
    "Key=spotinit:version,Value=$(stamp spotinit_version)"
log "registered $ami"
echo "$ami"
