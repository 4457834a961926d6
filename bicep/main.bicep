// The AI gateway on Azure: a Flex Consumption Function App in front of Azure OpenAI accounts in several regions,
// with its storage (host, deployment package, the gateway's tables), monitoring (Log Analytics, Application Insights,
// the workbook, alerts, diagnostic settings) and, optionally, private networking. Every connection uses the app's
// managed identity; no keys anywhere.
// Deploy: azd up, or az deployment group create -g <rg> -f bicep/main.bicep -p bicep/main.bicepparam (docs/deploy.md).

targetScope = 'resourceGroup'

metadata description = 'AI gateway on Azure Functions (Flex Consumption) in front of Azure OpenAI in several regions.'

// Decorators, not comments, describe the fields of these types: besides showing in editors, they keep every field on
// its own unambiguous line for parsers that read `a: t?` followed by `b: u` as a conditional expression.
type existingAccountRef = {
  @description('Name of an existing Azure OpenAI account: nothing is created for this region, the gateway is only granted access.')
  name: string

  @description('The account\'s resource group, when not this deployment\'s.')
  resourceGroup: string?

  @description('The account\'s subscription, when not this deployment\'s.')
  subscriptionId: string?

  @description('The account\'s endpoint, when its custom subdomain is not its name.')
  endpoint: string?

  @description('With private networking: auto needs the right to approve private endpoint connections on the account (Microsoft.CognitiveServices/accounts/privateEndpointConnectionsApproval/action); manual (the default) sends a request the account\'s owner approves, see docs/deploy.md.')
  privateEndpointApproval: ('auto' | 'manual')?
}

type breakerRule = {
  @description('The backend\'s circuit breaker (GATEWAY_BACKENDS[].breaker); each field is optional, see README.md.')
  statuses: string?

  @description('Failures within interval_s that open the breaker.')
  failures: int?

  @description('Seconds over which failures are counted.')
  interval_s: int?

  @description('Seconds the breaker stays open.')
  trip_s: int?

  @description('Open for as long as a 429\'s Retry-After says.')
  accept_retry_after: bool?

  @description('Longest time the breaker stays open.')
  max_trip_s: int?

  @description('Read timeouts within interval_s that open the breaker (a rate, so one caller cannot trip it).')
  timeout_failures: int?

  @description('Distinct consumers those timeouts must come from.')
  timeout_callers: int?
}

type backendRegion = {
  @description('Backend id (GATEWAY_BACKENDS[].id, metrics, x-gateway-backend): letters, digits, \'.\', \'_\', \'-\'.')
  @minLength(1)
  @maxLength(40)
  id: string

  @description('Azure region of the Azure OpenAI account.')
  location: string

  @description('Lower first; backends of equal priority share traffic by weight.')
  priority: int

  @description('Share of traffic among backends of equal priority.')
  weight: int

  @description('Deployments served from this region, each with its own SKU: [{ name, deploymentName?, model, modelVersion, sku, capacity }] (the modelDeployment type of modules/openai.bicep). For an existing account only name and deploymentName are used.')
  deployments: array

  @description('PTU backends: tokens of the reported remaining capacity kept for high-priority consumers.')
  reserveTokens: int?

  @description('PTU backends: the capacity of each deployment, { name: tokens a minute } by deployment name (GATEWAY_BACKENDS[].ptu_tokens_per_minute, docs/ptu.md): paced to from the first call instead of learnt from the first 429s.')
  ptuTokensPerMinute: object?

  @description('Set to use an existing account instead of creating one.')
  existingAccount: existingAccountRef?

  @description('The backend\'s circuit breaker rule.')
  breaker: breakerRule?
}

type privateDnsZoneIds = {
  @description('Existing privatelink.blob.<storage suffix> zone.')
  blob: string?

  @description('Existing privatelink.table.<storage suffix> zone.')
  table: string?

  @description('Existing privatelink.openai.azure.com zone.')
  openai: string?

  @description('Existing privatelink.cognitiveservices.azure.com zone.')
  cognitiveservices: string?

  @description('Existing privatelink.azurewebsites.net zone (the Function App\'s private endpoint).')
  sites: string?
}

@description('Name of the environment (azd: AZURE_ENV_NAME); part of the resource names\' unique suffix, tagged on every resource.')
@minLength(1)
@maxLength(64)
param environmentName string

@description('Region of the Function App, its storage and monitoring; one where Flex Consumption is offered.')
param location string = resourceGroup().location

@description('The pay-as-you-go Azure OpenAI backends, one per region: a new account with its model deployments, or an existing account.')
@minLength(1)
param backendRegions backendRegion[]

@description('Provisioned-throughput (PTU) backends, in the same shape. PTUs are billed by the hour whether used or not, and PTU quota is not granted by default: empty unless you have both. They are listed before the pay-as-you-go regions.')
param provisionedBackendRegions backendRegion[] = []

@description('Flex Consumption scale-out limit, and GATEWAY_INSTANCE_COUNT: while Table Storage is unreachable (fail mode open) each instance admits a consumer\'s limit divided by this.')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Memory of each instance, in MB.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Instances kept ready for the HTTP functions (billed while idle); 0 lets the app scale to zero, with cold starts.')
@minValue(0)
@maxValue(1000)
param alwaysReadyInstances int = 1

@description('Concurrent HTTP requests per instance; 0 keeps the platform default for the instance memory.')
@minValue(0)
@maxValue(1000)
param httpPerInstanceConcurrency int = 0

@description('GATEWAY_LIMIT_FAIL_MODE: with Table Storage unreachable, admit against a per-instance share of each limit (open) or answer 503 (closed).')
@allowed([
  'open'
  'closed'
])
param limitFailMode string = 'open'

@description('GATEWAY_ID, the gateway\'s name in metrics; empty for the Function App name.')
param gatewayId string = ''

@description('Entra ID callers: the tenant ids whose tokens the gateway accepts (GATEWAY_ENTRA_TENANT_IDS); empty with entraAudiences empty for keys only. README.md, Entra ID callers.')
param entraTenantIds string[] = []

@description('Entra ID callers: the audiences accepted, usually the gateway app registration\'s application id URI and application id, for example [\'api://<app-id>\', \'<app-id>\'] (GATEWAY_ENTRA_AUDIENCES).')
param entraAudiences string[] = []

@description('The operator console\'s sign-in: the application (client) id of the Entra ID app registration that defines the app roles Gateway.Admin and Gateway.Reader. Set, the template turns on App Service Authentication (Easy Auth) with Entra ID in front of /console (the OpenAI paths, /health and the admin API excluded) and GATEWAY_CONSOLE_EASY_AUTH=true; empty, no Easy Auth and the console takes the admin key or an Entra ID token. The registration is made once by an administrator (docs/deploy.md, The console\'s sign-in).')
param consoleSignInClientId string = ''

@description('The tenant of the console\'s app registration; the deployment\'s tenant by default.')
param consoleSignInTenantId string = tenant().tenantId

@description('More app settings for the gateway, for example { GATEWAY_MAX_ATTEMPTS: \'3\' } (README.md, Settings); they cannot replace the ones this template sets.')
param extraAppSettings object = {}

@description('Object id of an admin (user, group or service principal) to grant Storage Table Data Contributor, for the admin CLI, and Monitoring Reader on Application Insights; empty for none.')
param adminPrincipalId string = ''

@description('What adminPrincipalId is; a role assignment with the wrong type fails with UnmatchedPrincipalType. azd sets AZURE_PRINCIPAL_TYPE (main.bicepparam reads it).')
@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param adminPrincipalType string = 'User'

@description('Redundancy of the storage account that holds the consumers, limits and breaker state (zoneRedundant makes it Standard_ZRS).')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
])
param storageSkuName string = 'Standard_LRS'

@description('Storage accounts of their own for the consumers\' ledgers (GATEWAY_LEDGER_ACCOUNTS), each ledger in the one its consumer\'s id hashes to; 0 keeps the ledgers with the other tables. One account carries about 8,000 quiet consumers\' requests a second (docs/scale.md, "Consumers per storage account"). Changing the count moves ledgers: each consumer starts a fresh window in its new account.')
@minValue(0)
@maxValue(32)
param ledgerAccountCount int = 0

@description('Zone redundancy where the region has availability zones: the Flex Consumption plan spreads instances over zones and storage becomes Standard_ZRS. Flex Consumption requires at least two always-ready instances with it (alwaysReadyInstances, billed while idle).')
param zoneRedundant bool = false

@description('Private networking: virtual network integration for the Function App with all its outbound traffic routed through the network, private endpoints for storage and every Azure OpenAI account, public access off for storage and for new Azure OpenAI accounts.')
param enablePrivateNetworking bool = false

@description('Who may call the gateway: public (anyone with a consumer key), restricted (only appAllowedIpRanges; everyone else gets 403 from the platform), private (a private endpoint in the virtual network; public network access off; needs enablePrivateNetworking).')
@allowed([
  'public'
  'restricted'
  'private'
])
param appInboundAccess string = 'public'

@description('With appInboundAccess restricted: public IP addresses or CIDR ranges allowed to call the gateway.')
param appAllowedIpRanges string[] = []

@description('With private networking: a NAT gateway (with one public IP address) gives the integrated subnet its outbound internet access (Microsoft Entra ID, Application Insights ingestion). Turn it off when the subnet already routes outbound through your own firewall.')
param createNatGateway bool = true

@description('With private networking: existing private DNS zones to use instead of creating them (resource ids), for networks whose zones live in a hub; zones not given are created here and linked to the new network.')
param existingPrivateDnsZoneIds privateDnsZoneIds = {}

param vnetAddressPrefix string = '10.40.0.0/16'
param appSubnetPrefix string = '10.40.0.0/24'
param privateEndpointSubnetPrefix string = '10.40.1.0/24'

@description('With private networking: public IP addresses or CIDR ranges still allowed to reach storage (an admin workstation running the admin CLI); empty blocks public access.')
param storageAllowedIpRanges string[] = []

@minValue(30)
@maxValue(730)
param logRetentionInDays int = 30

@description('E-mail address notified by the alerts; empty for none.')
param alertEmail string = ''

@description('Resource ids of existing action groups notified by the alerts.')
param alertActionGroupIds string[] = []

@description('Alert when one consumer gets at least this many 429s in fifteen minutes, throttled in three minutes of them or more.')
@minValue(1)
param throttledRequestsThreshold int = 20

@description('Alert when this percentage of the gateway\'s answers in fifteen minutes are 5xx (with at least 20 answers).')
@minValue(1)
@maxValue(100)
param serverErrorPercentThreshold int = 5

@description('Alert when a PTU deployment\'s utilisation averages at least this percentage over fifteen minutes.')
@minValue(1)
@maxValue(100)
param ptuUtilizationPercentThreshold int = 90

param tags object = {}

@description('Safety policies (docs/safety.md), as GATEWAY_SAFETY_POLICIES: policy name -> properties. With any policy, an Azure AI Content Safety and an Azure AI Language account are used (new, unless named below) and the gateway identity gets Cognitive Services User on each.')
param safetyPolicies object = {}

@description('An existing Azure AI Content Safety account in this resource group, instead of a new one.')
param existingContentSafetyName string = ''

@description('An existing Azure AI Language account in this resource group, instead of a new one.')
param existingLanguageName string = ''

@description('Days an audit blob of the safety policies is kept after its last write (the storage lifecycle rule).')
@minValue(1)
param auditRetentionDays int = 90

var resourceToken = toLower(uniqueString(subscription().id, resourceGroup().id, environmentName))
var allTags = union(tags, { 'azd-env-name': environmentName })
var appName = 'func-aigw-${resourceToken}'
var storageName = 'staigw${resourceToken}'
var vnetName = 'vnet-aigw-${resourceToken}'
var deploymentContainerName = 'app-package'
var regions = concat(provisionedBackendRegions, backendRegions)

// Where each backend's account lives: created here (named from the backend id, ending in the unique suffix so the
// name ends in a letter or digit whatever the id) or given.
// Every backend of provisionedBackendRegions is a PTU backend (paced, and alerted on its utilisation), an existing
// account's too, whose deployments carry no SKU here; a PTU deployment listed in backendRegions is one as well.
var accounts = [for (region, i) in regions: {
  create: region.?existingAccount == null
  name: region.?existingAccount.?name ?? 'oai-${toLower(replace(replace(region.id, '_', '-'), '.', '-'))}-${resourceToken}'
  subscriptionId: region.?existingAccount.?subscriptionId ?? subscription().subscriptionId
  resourceGroup: region.?existingAccount.?resourceGroup ?? resourceGroup().name
  manualApproval: region.?existingAccount != null && (region.?existingAccount.?privateEndpointApproval ?? 'manual') == 'manual'
  provisioned: i < length(provisionedBackendRegions) || length(filter(region.deployments, d => contains(d.?sku ?? '', 'Provisioned'))) > 0
  region: region
}]
var newAccounts = filter(accounts, account => account.create)
var existingAccounts = filter(accounts, account => !account.create)

// GATEWAY_BACKENDS (shared/config.py): one backend per region, authenticated with the app's identity.
var backends = [for (region, i) in regions: {
  id: region.id
  endpoint: region.?existingAccount.?endpoint ?? 'https://${accounts[i].name}.openai.azure.com'
  region: region.location
  deployments: toObject(region.deployments, deployment => deployment.name, deployment => deployment.?deploymentName ?? deployment.name)
  priority: region.priority
  weight: region.weight
  ptu: accounts[i].provisioned
  api: 'azure'
  auth: 'identity'
  reserve_tokens: region.?reserveTokens ?? 0
  ptu_tokens_per_minute: region.?ptuTokensPerMinute ?? {}
  breaker: region.?breaker ?? {}
}]

module identity 'modules/identity.bicep' = {
  name: 'aigw-identity-${resourceToken}'
  params: {
    name: 'id-aigw-${resourceToken}'
    location: location
    tags: allTags
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'aigw-monitoring-${resourceToken}'
  params: {
    logAnalyticsName: 'log-aigw-${resourceToken}'
    appInsightsName: 'appi-aigw-${resourceToken}'
    location: location
    tags: allTags
    retentionInDays: logRetentionInDays
  }
}

module storage 'modules/storage.bicep' = {
  name: 'aigw-storage-${resourceToken}'
  params: {
    name: storageName
    location: location
    tags: allTags
    deploymentContainerName: deploymentContainerName
    skuName: zoneRedundant ? 'Standard_ZRS' : storageSkuName
    privateNetworking: enablePrivateNetworking
    allowedIpRanges: storageAllowedIpRanges
    logAnalyticsId: monitoring.outputs.logAnalyticsId
    auditRetentionDays: auditRetentionDays
  }
}

module ledgerStorage 'modules/ledger-storage.bicep' = [for i in range(0, ledgerAccountCount): {
  name: 'aigw-ledger-${i}-${resourceToken}'
  params: {
    name: take('stlg${i}${resourceToken}', 24)
    location: location
    tags: allTags
    skuName: zoneRedundant ? 'Standard_ZRS' : storageSkuName
    gatewayPrincipalId: identity.outputs.principalId
    privateNetworking: enablePrivateNetworking
    allowedIpRanges: storageAllowedIpRanges
    privateEndpointSubnetId: enablePrivateNetworking ? network.outputs.privateEndpointSubnetId : ''
    tableDnsZoneId: enablePrivateNetworking ? network.outputs.tableZoneId : ''
  }
}]

var safetyOn = !empty(safetyPolicies)

module contentSafety 'modules/safety.bicep' = if (safetyOn) {
  name: 'aigw-contentsafety-${resourceToken}'
  params: {
    kind: 'ContentSafety'
    name: empty(existingContentSafetyName) ? 'cs-aigw-${resourceToken}' : existingContentSafetyName
    existing: !empty(existingContentSafetyName)
    location: location
    tags: allTags
    gatewayPrincipalId: identity.outputs.principalId
  }
}

module language 'modules/safety.bicep' = if (safetyOn) {
  name: 'aigw-language-${resourceToken}'
  params: {
    kind: 'TextAnalytics'
    name: empty(existingLanguageName) ? 'lang-aigw-${resourceToken}' : existingLanguageName
    existing: !empty(existingLanguageName)
    location: location
    tags: allTags
    gatewayPrincipalId: identity.outputs.principalId
  }
}

module roles 'modules/roles.bicep' = {
  name: 'aigw-roles-${resourceToken}'
  params: {
    storageAccountName: storage.outputs.name
    appInsightsName: monitoring.outputs.appInsightsName
    gatewayPrincipalId: identity.outputs.principalId
    adminPrincipalId: adminPrincipalId
    adminPrincipalType: adminPrincipalType
  }
}

module openAI 'modules/openai.bicep' = [for account in newAccounts: {
  name: 'aigw-openai-${uniqueString(resourceToken, account.name)}'
  params: {
    name: account.name
    location: account.region.location
    tags: allTags
    deployments: account.region.deployments
    gatewayPrincipalId: identity.outputs.principalId
    privateNetworking: enablePrivateNetworking
    logAnalyticsId: monitoring.outputs.logAnalyticsId
  }
}]

module openAIAccess 'modules/openai-access.bicep' = [for account in existingAccounts: {
  name: 'aigw-openai-access-${uniqueString(resourceToken, account.subscriptionId, account.resourceGroup, account.name)}'
  scope: resourceGroup(account.subscriptionId, account.resourceGroup)
  params: {
    accountName: account.name
    gatewayPrincipalId: identity.outputs.principalId
  }
}]

module network 'modules/network.bicep' = if (enablePrivateNetworking) {
  name: 'aigw-network-${resourceToken}'
  params: {
    name: vnetName
    location: location
    tags: allTags
    addressPrefix: vnetAddressPrefix
    appSubnetPrefix: appSubnetPrefix
    privateEndpointSubnetPrefix: privateEndpointSubnetPrefix
    storageAccountId: storage.outputs.id
    openAIAccounts: [for account in accounts: {
      id: resourceId(account.subscriptionId, account.resourceGroup, 'Microsoft.CognitiveServices/accounts', account.name)
      manualApproval: account.manualApproval
    }]
    createNatGateway: createNatGateway
    existingDnsZoneIds: existingPrivateDnsZoneIds
  }
  dependsOn: [
    openAI
  ]
}

module functionApp 'modules/functionapp.bicep' = {
  name: 'aigw-functionapp-${resourceToken}'
  params: {
    planName: 'plan-aigw-${resourceToken}'
    appName: appName
    location: location
    tags: allTags
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    storageAccountName: storage.outputs.name
    deploymentContainerUrl: storage.outputs.deploymentContainerUrl
    appInsightsName: monitoring.outputs.appInsightsName
    logAnalyticsId: monitoring.outputs.logAnalyticsId
    backends: backends
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    alwaysReadyInstances: alwaysReadyInstances
    httpPerInstanceConcurrency: httpPerInstanceConcurrency
    limitFailMode: limitFailMode
    entraTenantIds: entraTenantIds
    entraAudiences: entraAudiences
    consoleSignInClientId: consoleSignInClientId
    consoleSignInTenantId: consoleSignInTenantId
    gatewayId: empty(gatewayId) ? appName : gatewayId
    extraAppSettings: extraAppSettings
    // The accounts' table endpoints, known before they exist (the app is created after them: dependsOn below).
    ledgerAccountEndpoints: [for i in range(0, ledgerAccountCount): 'https://${take('stlg${i}${resourceToken}', 24)}.table.${environment().suffixes.storage}/']
    safetyPolicies: safetyPolicies
    contentSafetyEndpoint: safetyOn ? contentSafety.outputs.endpoint : ''
    languageEndpoint: safetyOn ? language.outputs.endpoint : ''
    subnetId: enablePrivateNetworking ? resourceId('Microsoft.Network/virtualNetworks/subnets', vnetName, 'app') : ''
    inboundAccess: appInboundAccess
    allowedIpRanges: appAllowedIpRanges
    zoneRedundant: zoneRedundant
  }
  // The host reaches its storage at start-up and the gateway its backends at the first request: the role
  // assignments (and, when private, the endpoints) exist first.
  dependsOn: [
    roles
    network
    openAI
    openAIAccess
    ledgerStorage
  ]
}

// The gateway's own private endpoint: after the app exists, in the network module's subnet.
module appEndpoint 'modules/app-endpoint.bicep' = if (enablePrivateNetworking && appInboundAccess == 'private') {
  name: 'aigw-app-endpoint-${resourceToken}'
  params: {
    name: 'pe-${appName}'
    location: location
    tags: allTags
    appId: functionApp.outputs.id
    subnetId: resourceId('Microsoft.Network/virtualNetworks/subnets', vnetName, 'private-endpoints')
    dnsZoneId: enablePrivateNetworking ? network.outputs.sitesZoneId : ''
  }
}

module alerts 'modules/alerts.bicep' = {
  name: 'aigw-alerts-${resourceToken}'
  params: {
    appInsightsId: monitoring.outputs.appInsightsId
    location: location
    tags: allTags
    throttledRequestsThreshold: throttledRequestsThreshold
    serverErrorPercentThreshold: serverErrorPercentThreshold
    ptuUtilizationPercentThreshold: ptuUtilizationPercentThreshold
    provisionedAccountIds: [for account in filter(accounts, a => a.provisioned): resourceId(account.subscriptionId, account.resourceGroup, 'Microsoft.CognitiveServices/accounts', account.name)]
    alertEmail: alertEmail
    actionGroupIds: alertActionGroupIds
  }
  dependsOn: [
    openAI
  ]
}

output AZURE_LOCATION string = location
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output GATEWAY_URL string = 'https://${functionApp.outputs.defaultHostName}'
output GATEWAY_TABLE_ENDPOINT string = storage.outputs.tableEndpoint
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output APPLICATIONINSIGHTS_RESOURCE_ID string = monitoring.outputs.appInsightsId
output GATEWAY_IDENTITY_CLIENT_ID string = identity.outputs.clientId
output GATEWAY_BACKEND_ENDPOINTS array = [for backend in backends: backend.endpoint]
@description('Private endpoint connections waiting for approval on existing accounts (approve them, docs/deploy.md).')
output PENDING_PRIVATE_ENDPOINT_APPROVALS array = enablePrivateNetworking ? network.outputs.manualApprovalEndpoints : []
