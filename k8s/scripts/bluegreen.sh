#!/usr/bin/env bash
# Blue-green releases of the model server (k8s/base/model.yaml; its one Deployment,
# k8s/base/model-deployment/, is rendered per slot by k8s/base/model-slots/{blue,green}).
#
# Two Deployments, model-blue and model-green, labelled aistack.io/slot. The Service `model`
# (what the orchestrator and the pipeline call) selects the live slot; `model-preview` selects the
# idle one, for smoke tests. The model HPA follows the live slot.
#
#   bluegreen.sh status                 which slot is live, images and ready replicas
#   bluegreen.sh deploy IMAGE           roll IMAGE out on the idle slot (as many replicas as live)
#   bluegreen.sh switch                 send traffic to the idle slot; remembers the previous one
#   bluegreen.sh rollback               send traffic back to the previous slot (still running)
#   bluegreen.sh retire                 scale the idle slot to 0 once the new one is trusted
#
# Environment: NAMESPACE (aistack), KUBECTL (kubectl), TIMEOUT for rollouts (600s).
set -euo pipefail

NAMESPACE=${NAMESPACE:-aistack}
KUBECTL=${KUBECTL:-kubectl}
TIMEOUT=${TIMEOUT:-600s}
k() { "$KUBECTL" -n "$NAMESPACE" "$@"; }

live_slot() { k get service model -o jsonpath='{.spec.selector.aistack\.io/slot}'; }
other() { if [ "$1" = blue ]; then echo green; else echo blue; fi; }
die() { echo "bluegreen: $*" >&2; exit 1; }

point_services() {  # point_services LIVE: model -> LIVE, model-preview -> the other, HPA -> LIVE
  local live=$1 idle previous
  idle=$(other "$live")
  previous=$(live_slot)
  k patch service model --type merge -p \
    "{\"metadata\":{\"annotations\":{\"aistack.io/previous-slot\":\"$previous\"}},\"spec\":{\"selector\":{\"aistack.io/slot\":\"$live\"}}}"
  k patch service model-preview --type merge -p "{\"spec\":{\"selector\":{\"aistack.io/slot\":\"$idle\"}}}"
  k patch hpa model --type merge -p "{\"spec\":{\"scaleTargetRef\":{\"name\":\"model-$live\"}}}"
  echo "live: $live (was $previous)"
}

require_ready() {  # the slot must have every replica ready before it takes traffic
  local slot=$1 want ready
  want=$(k get deployment "model-$slot" -o jsonpath='{.spec.replicas}')
  ready=$(k get deployment "model-$slot" -o jsonpath='{.status.readyReplicas}')
  [ "${want:-0}" -gt 0 ] || die "model-$slot has 0 replicas: deploy to it first"
  [ "${ready:-0}" -ge "$want" ] || die "model-$slot has ${ready:-0}/$want ready replicas"
}

cmd=${1:-status}
case "$cmd" in
  status)
    live=$(live_slot)
    echo "live slot: $live (previous: $(k get service model -o jsonpath='{.metadata.annotations.aistack\.io/previous-slot}'))"
    for slot in blue green; do
      echo "model-$slot: $(k get deployment "model-$slot" -o jsonpath='{.spec.template.spec.containers[0].image} {.status.readyReplicas}/{.spec.replicas} ready')"
    done
    ;;
  deploy)
    image=${2:?usage: bluegreen.sh deploy IMAGE}
    live=$(live_slot); idle=$(other "$live")
    replicas=$(k get deployment "model-$live" -o jsonpath='{.spec.replicas}')
    k set image "deployment/model-$idle" "model=$image"
    k scale "deployment/model-$idle" --replicas="${replicas:-1}"
    k rollout status "deployment/model-$idle" --timeout="$TIMEOUT"
    echo "model-$idle runs $image; smoke-test it through service/model-preview, then: $0 switch"
    ;;
  switch)
    idle=$(other "$(live_slot)")
    require_ready "$idle"
    point_services "$idle"
    ;;
  rollback)
    previous=$(k get service model -o jsonpath='{.metadata.annotations.aistack\.io/previous-slot}')
    [ -n "$previous" ] || die "no previous slot recorded"
    require_ready "$previous"
    point_services "$previous"
    ;;
  retire)
    idle=$(other "$(live_slot)")
    k scale "deployment/model-$idle" --replicas=0
    echo "model-$idle scaled to 0; rollback now needs a deploy first"
    ;;
  *)
    sed -n '2,16p' "$0"; exit 2 ;;
esac
