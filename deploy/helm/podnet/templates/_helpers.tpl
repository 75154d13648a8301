{{/*
Labels of every object: what `kubectl get -l app.kubernetes.io/part-of=podnet` finds.
*/}}
{{- define "podnet.labels" -}}
app.kubernetes.io/name: podnet
app.kubernetes.io/part-of: podnet
{{- end }}

{{/*
The agent's pods (the DaemonSet's selector and pod labels, the Service's and PodMonitor's
selectors).
*/}}
{{- define "podnet.selectorLabels" -}}
app.kubernetes.io/name: podnet
app.kubernetes.io/component: agent
{{- end }}

{{/*
The image of every container: repository and tag (the chart's appVersion by default).
*/}}
{{- define "podnet.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/*
The runbook URL prefix the rule file is written with; `monitoring.runbookBaseURL` replaces
it.
*/}}
{{- define "podnet.shippedRunbookBase" -}}
https://example.invalid/podnet/blob/main/deploy/RUNBOOK.md
{{- end }}
