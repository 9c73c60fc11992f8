{{- define "ferry.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ferry.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ferry.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "ferry.secretName" -}}
{{- if .Values.existingSecret -}}{{ .Values.existingSecret }}{{- else -}}{{ include "ferry.fullname" . }}{{- end -}}
{{- end -}}

{{- define "ferry.image" -}}
{{ printf "%s:%s" .Values.image.repository (.Values.image.tag | toString) }}
{{- end -}}

{{/* Environment every Ferry container reads: the Secret, then the shared settings. */}}
{{- define "ferry.env" -}}
envFrom:
  - secretRef:
      name: {{ include "ferry.secretName" . }}
{{- with .Values.settings }}
env:
{{- range $name, $value := . }}
  - name: {{ $name }}
    value: {{ $value | toString | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* `ferry migrate` before the process: it takes an advisory lock, so any number of pods
may run it at once and the first applies what is pending. */}}
{{- define "ferry.migrate" -}}
initContainers:
  - name: migrate
    image: {{ include "ferry.image" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    args: ["migrate"]
    {{- include "ferry.env" . | nindent 4 }}
{{- end -}}
