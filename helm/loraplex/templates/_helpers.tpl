{{- define "loraplex.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "loraplex.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "loraplex.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "loraplex.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* selector labels of one component: (dict "ctx" $ "component" "gateway") */}}
{{- define "loraplex.selector" -}}
app.kubernetes.io/name: {{ include "loraplex.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "loraplex.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "loraplex.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "loraplex.image" -}}
{{- $tag := default .ctx.Chart.AppVersion .ctx.Values.image.tag -}}
{{- printf "%s/%s:%s" .ctx.Values.image.registry .image.repository $tag -}}
{{- end -}}

{{/* the engines' headless Service: one DNS name, an A record per ready engine pod */}}
{{- define "loraplex.engineService" -}}
{{- printf "%s-engine" (include "loraplex.fullname" .) -}}
{{- end -}}

{{/* the engines' DNS name (host:port): gateways route over its records (LORAPLEX_ENGINE_DNS) */}}
{{- define "loraplex.engineDns" -}}
{{- printf "%s.%s.svc.cluster.local:%d" (include "loraplex.engineService" .) .Release.Namespace (int .Values.engine.port) -}}
{{- end -}}

{{/* env entries read from existing Secrets: (dict "ctx" $ "names" (list "databaseUrl" ...));
     only those given a Secret name are rendered */}}
{{- define "loraplex.secretEnv" -}}
{{- $vars := dict "databaseUrl" "LORAPLEX_DATABASE_URL" "redisUrl" "LORAPLEX_REDIS_URL" "secretKey" "LORAPLEX_SECRET_KEY" "adminToken" "LORAPLEX_ADMIN_TOKEN" "engineToken" "LORAPLEX_ENGINE_TOKEN" "s3AccessKeyId" "AWS_ACCESS_KEY_ID" "s3SecretAccessKey" "AWS_SECRET_ACCESS_KEY" -}}
{{- $s := .ctx.Values.secrets -}}
{{- range $key := .names }}
{{- $ref := get $s $key }}
{{- if $ref.name }}
- name: {{ get $vars $key }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.name }}
      key: {{ $ref.key }}
      {{- if $ref.optional }}
      optional: true
      {{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* extra env of one component: a map of LORAPLEX_* names to values */}}
{{- define "loraplex.extraEnv" -}}
{{- range $k, $v := . }}
- name: {{ $k }}
  value: {{ $v | toString | quote }}
{{- end }}
{{- end -}}

{{/* the gateway container: in the gateway Deployment (routing over every engine found at
     the headless Service's DNS name), and beside each engine when an InferencePool routes
     to engine pods (its own engine only): (dict "ctx" $ "engineUrl" URL-or-empty) */}}
{{- define "loraplex.gatewayContainer" -}}
{{- $ctx := .ctx -}}
- name: gateway
  image: {{ include "loraplex.image" (dict "ctx" $ctx "image" .ctx.Values.gateway.image) }}
  imagePullPolicy: {{ .ctx.Values.image.pullPolicy }}
  args:
    - gateway
    {{- if .engineUrl }}
    - --engine={{ .engineUrl }}
    {{- end }}
    - --host=0.0.0.0
    - --port={{ .ctx.Values.gateway.port }}
    - --workers={{ .ctx.Values.gateway.workers }}
  ports:
    - name: http
      containerPort: {{ .ctx.Values.gateway.port }}
      protocol: TCP
  envFrom:
    - configMapRef:
        name: {{ include "loraplex.fullname" .ctx }}
  env:
    - name: LORAPLEX_MODE
      value: production
    - name: LORAPLEX_DATA_DIR
      value: /var/lib/loraplex
    {{- if not .engineUrl }}
    - name: LORAPLEX_ENGINE_DNS
      value: {{ include "loraplex.engineDns" .ctx | quote }}
    {{- end }}
    - name: LORAPLEX_DRAIN_DELAY_S
      value: {{ .ctx.Values.gateway.drain.delaySeconds | quote }}
    - name: LORAPLEX_DRAIN_GRACE_S
      value: {{ .ctx.Values.gateway.drain.graceSeconds | quote }}
    {{- if .ctx.Values.migrations.enabled }}
    - name: LORAPLEX_MIGRATE_ON_START
      value: "false"
    {{- end }}
    {{- include "loraplex.secretEnv" (dict "ctx" $ctx "names" (list "databaseUrl" "redisUrl" "secretKey" "adminToken" "engineToken" "s3AccessKeyId" "s3SecretAccessKey")) | indent 4 }}
    {{- include "loraplex.extraEnv" .ctx.Values.gateway.env | indent 4 }}
  startupProbe:
    httpGet: {path: /health, port: http}
    periodSeconds: 2
    failureThreshold: 60
  livenessProbe:
    httpGet: {path: /health, port: http}
    periodSeconds: 10
    timeoutSeconds: 3
    failureThreshold: 3
  readinessProbe:
    httpGet: {path: /ready, port: http}
    periodSeconds: 5
    timeoutSeconds: 3
    failureThreshold: 2
  resources:
    {{- toYaml .ctx.Values.gateway.resources | nindent 4 }}
  securityContext:
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities: {drop: [ALL]}
  volumeMounts:
    - name: data
      mountPath: /var/lib/loraplex
    - name: tmp
      mountPath: /tmp
{{- end -}}

{{/* settings every release needs: fail at render time, not in a crash-looping pod */}}
{{- define "loraplex.validate" -}}
{{- if not .Values.secrets.databaseUrl.name -}}
{{- fail "secrets.databaseUrl.name: gateways need a database (an existing Secret with LORAPLEX_DATABASE_URL)" -}}
{{- end -}}
{{- if not .Values.secrets.secretKey.name -}}
{{- fail "secrets.secretKey.name: production mode needs LORAPLEX_SECRET_KEY from an existing Secret" -}}
{{- end -}}
{{- $many := or .Values.gateway.autoscaling.enabled (gt (int .Values.gateway.replicas) 1) -}}
{{- if and $many (not .Values.secrets.redisUrl.name) -}}
{{- fail "secrets.redisUrl.name: more than one gateway pod needs Redis for exact limits" -}}
{{- end -}}
{{- if not .Values.settings.objectStoreUrl -}}
{{- fail "settings.objectStoreUrl: set the s3://bucket/prefix adapters are kept in (gateways and engines share it)" -}}
{{- end -}}
{{- end -}}
