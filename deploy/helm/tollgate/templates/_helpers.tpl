{{- define "tollgate.name" -}}{{ .Release.Name }}-tollgate{{- end -}}
{{- define "tollgate.secret" -}}{{ .Values.existingSecret | default (include "tollgate.name" .) }}{{- end -}}
{{- define "tollgate.redisUrl" -}}
{{- if .Values.redis.enabled -}}redis://:${REDIS_PASSWORD}@{{ include "tollgate.name" . }}-redis:6379/0{{- else -}}{{ required "redis.url is needed when redis.enabled is false" .Values.redis.url }}{{- end -}}
{{- end -}}
{{- define "tollgate.clientVar" -}}TOLLGATE_CLIENT_KEY_{{ . | upper | replace "-" "_" }}{{- end -}}
{{- define "tollgate.labels" -}}app.kubernetes.io/name: tollgate, app.kubernetes.io/instance: {{ .Release.Name }}{{- end -}}
