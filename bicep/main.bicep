// The AI gateway on Azure: a Flex Consumption Function App in front of Azure OpenAI accounts in several regions,
// with its storage (host, deployment package, the gateway's tables), monitoring (Application Insights, the workbook,
// alerts) and, optionally, private networking. Every connection uses the app's managed identity; no keys anywhere.
// Deploy: azd up, or az deployment group create -g <rg> -f bicep/main.bicep -p bicep/main.bicepparam (docs/deploy.md).

targetScope = 'resourceGroup'

metadata description = 'AI gateway on Azure Functions (Flex Consumption) in front of Azure OpenAI in several regions.'

type deploymentSku = 'ProvisionedManaged' | 'GlobalProvisionedManaged' | 'DataZoneProvisionedManaged' | 'Standard' | 'GlobalStandard' | 'DataZoneStandard'

type existingAccountRef = {
  // Name of an existing Azure OpenAI account: nothing is created for this region, the gateway is only granted access.
  name: string
  // The account's resource group and subscription, when not this deployment's.
  resourceGroup: string?
  subscriptionId: string?
  // The account's endpoint, when its custom subdomain is not its name.
  endpoint: string?
}

type breakerRule = {
  // The backend's circuit breaker (GATEWAY_BACKENDS[].breaker); each field is optional, see README.md.
  statuses: string?
  failures: int?
  interval_s: int?
  trip_s: int?
  accept_retry_after: bool?
  max_trip_s: int?
}

type backendRegion = {
  // Backend id (GATEWAY_BACKENDS[].id, metrics, x-gateway-backend): letters, digits, '.', '_', '-'.
  id: string
  // Azure region of the Azure OpenAI account.
  location: string
  // Lower first; backends of equal priority share traffic by weight.
  priority: int
  weight: int
  // Deployment SKU of this region's deployments; the ProvisionedManaged SKUs make it a PTU backend.
  sku: deploymentSku
  // PTU backends: tokens of the reported remaining capacity kept for high-priority consumers.
  reserveTokens: int?
  // Set to use an existing account instead of creating one.
  existingAccount: existingAccountRef?
  // Deployments served from this region: [{ name, deploymentName?, model, modelVersion, capacity }] (modules/openai.bicep).
  // For an existing account only name and deploymentName are used.
  deployments: array
  breaker: breakerRule?
}

@description('Name of the environment (azd: AZURE_ENV_NAME); part of the resource names\' unique suffix, tagged on every resource.')
@minLength(1)
@maxLength(64)
param environmentName string

@description('Region of the Function App, its storage and monitoring; one where Flex Consumption is offered.')
param location string = resourceGroup().location

@description('The Azure OpenAI backends, one per region: a new account with its model deployments, or an existing account.')
@minLength(1)
param backendRegions backendRegion[]

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

@description('More app settings for the gateway, for example { GATEWAY_MAX_ATTEMPTS: \'3\' } (README.md, Settings); they cannot replace the ones this template sets.')
param extraAppSettings object = {}

@description('Object id of an admin (user, group or service principal) to grant Storage Table Data Contributor, for the admin CLI, and Monitoring Reader on Application Insights; empty for none.')
param adminPrincipalId string = ''

@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param adminPrincipalType string = 'User'

@description('Redundancy of the storage account that holds the consumers, limits and breaker state.')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
])
param storageSkuName string = 'Standard_LRS'

@description('Private networking: virtual network integration for the Function App, private endpoints for storage and every Azure OpenAI account, public access off for storage and for new Azure OpenAI accounts.')
param enablePrivateNetworking bool = false

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

@description('Alert when one consumer gets at least this many 429s in five minutes, throttled in three of them or more.')
@minValue(1)
param throttledRequestsThreshold int = 20

param tags object = {}

var resourceToken = toLower(uniqueString(subscription().id, resourceGroup().id, environmentName))
var allTags = union(tags, { 'azd-env-name': environmentName })
var appName = 'func-aigw-${resourceToken}'
var storageName = 'staigw${resourceToken}'
var vnetName = 'vnet-aigw-${resourceToken}'
var deploymentContainerName = 'app-package'

// Where each backend's account lives: created here (named from the backend id) or given.
var accounts = [for region in backendRegions: {
  create: region.?existingAccount == null
  name: region.?existingAccount.?name ?? toLower(take('oai-${resourceToken}-${replace(replace(region.id, '_', '-'), '.', '-')}', 64))
  subscriptionId: region.?existingAccount.?subscriptionId ?? subscription().subscriptionId
  resourceGroup: region.?existingAccount.?resourceGroup ?? resourceGroup().name
  region: region
}]
var newAccounts = filter(accounts, account => account.create)
var existingAccounts = filter(accounts, account => !account.create)
var accountIds = [for account in accounts: resourceId(account.subscriptionId, account.resourceGroup, 'Microsoft.CognitiveServices/accounts', account.name)]

// GATEWAY_BACKENDS (shared/config.py): one backend per region, authenticated with the app's identity.
var backends = [for (region, i) in backendRegions: {
  id: region.id
  endpoint: region.?existingAccount.?endpoint ?? 'https://${accounts[i].name}.openai.azure.com'
  region: region.location
  deployments: toObject(region.deployments, deployment => deployment.name, deployment => deployment.?deploymentName ?? deployment.name)
  priority: region.priority
  weight: region.weight
  ptu: contains(region.sku, 'Provisioned')
  api: 'azure'
  auth: 'identity'
  reserve_tokens: region.?reserveTokens ?? 0
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

module storage 'modules/storage.bicep' = {
  name: 'aigw-storage-${resourceToken}'
  params: {
    name: storageName
    location: location
    tags: allTags
    deploymentContainerName: deploymentContainerName
    skuName: storageSkuName
    privateNetworking: enablePrivateNetworking
    allowedIpRanges: storageAllowedIpRanges
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
  name: take('aigw-openai-${resourceToken}-${account.region.id}', 64)
  params: {
    name: account.name
    location: account.region.location
    tags: allTags
    sku: account.region.sku
    deployments: account.region.deployments
    gatewayPrincipalId: identity.outputs.principalId
    privateNetworking: enablePrivateNetworking
  }
}]

module openAIAccess 'modules/openai-access.bicep' = [for account in existingAccounts: {
  name: take('aigw-openai-access-${resourceToken}-${account.region.id}', 64)
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
    openAIAccountIds: accountIds
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
    backends: backends
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    alwaysReadyInstances: alwaysReadyInstances
    httpPerInstanceConcurrency: httpPerInstanceConcurrency
    limitFailMode: limitFailMode
    gatewayId: empty(gatewayId) ? appName : gatewayId
    extraAppSettings: extraAppSettings
    subnetId: enablePrivateNetworking ? resourceId('Microsoft.Network/virtualNetworks/subnets', vnetName, 'app') : ''
  }
  // The host reaches its storage at start-up and the gateway its backends at the first request: the role
  // assignments (and, when private, the endpoints) exist first.
  dependsOn: [
    roles
    network
    openAI
    openAIAccess
  ]
}

module alerts 'modules/alerts.bicep' = {
  name: 'aigw-alerts-${resourceToken}'
  params: {
    appInsightsId: monitoring.outputs.appInsightsId
    location: location
    tags: allTags
    throttledRequestsThreshold: throttledRequestsThreshold
    alertEmail: alertEmail
    actionGroupIds: alertActionGroupIds
  }
}

output AZURE_LOCATION string = location
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output GATEWAY_URL string = 'https://${functionApp.outputs.defaultHostName}'
output GATEWAY_TABLE_ENDPOINT string = storage.outputs.tableEndpoint
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output APPLICATIONINSIGHTS_RESOURCE_ID string = monitoring.outputs.appInsightsId
output GATEWAY_IDENTITY_CLIENT_ID string = identity.outputs.clientId
output GATEWAY_BACKEND_ENDPOINTS array = [for backend in backends: backend.endpoint]
