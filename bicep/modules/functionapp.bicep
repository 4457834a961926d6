// The gateway: a Python 3.11 Function App on the Flex Consumption plan, running as the user-assigned identity.
// HTTPS only, TLS 1.2 minimum, FTP and basic-auth publishing off, no keys or connection strings in app settings.
// Inbound: public, restricted to given addresses, or private (a private endpoint, modules/app-endpoint.bicep).
// Outbound, when integrated with a subnet: all of it through the network (explicitly, allTraffic).

param planName string
param appName string
param location string
param tags object

@description('Resource id of the user-assigned identity the app runs as.')
param identityId string

@description('Client id of that identity (DefaultAzureCredential and the Functions host pick it with this).')
param identityClientId string

param storageAccountName string

@description('Blob container URL the Flex Consumption plan deploys the package to.')
param deploymentContainerUrl string

param appInsightsName string

@description('Log Analytics workspace that receives the app\'s logs and platform metrics.')
param logAnalyticsId string

@description('The gateway\'s backends (GATEWAY_BACKENDS), as built by main.bicep.')
param backends array

@minValue(40)
@maxValue(1000)
param maximumInstanceCount int

@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int

@minValue(0)
param alwaysReadyInstances int

@description('Concurrent HTTP requests per instance; 0 keeps the platform default for the memory size.')
@minValue(0)
param httpPerInstanceConcurrency int

@allowed([
  'open'
  'closed'
])
param limitFailMode string

param gatewayId string

@description('Tenant ids whose Entra ID access tokens are accepted; empty: keys only.')
param entraTenantIds string[] = []

@description('Audiences accepted in Entra ID access tokens (the gateway app registration).')
param entraAudiences string[] = []

@description('The console\'s Entra ID app registration (client id); empty: no App Service Authentication.')
param consoleSignInClientId string = ''

@description('The tenant of the console\'s app registration.')
param consoleSignInTenantId string = ''

@description('More app settings (tuning such as GATEWAY_MAX_ATTEMPTS); they cannot replace the ones set here.')
param extraAppSettings object = {}

@description('Table endpoints of the ledgers\' own storage accounts (GATEWAY_LEDGER_ACCOUNTS); empty: with the other tables.')
param ledgerAccountEndpoints array = []

@description('Subnet (delegated to Microsoft.App/environments) for virtual network integration; empty for none.')
param subnetId string = ''

@description('public: anyone may call (consumer keys decide); restricted: only allowedIpRanges; private: public network access off (a private endpoint is the way in).')
@allowed([
  'public'
  'restricted'
  'private'
])
param inboundAccess string = 'public'

@description('With inboundAccess restricted: IP addresses or CIDR ranges allowed to call the gateway.')
param allowedIpRanges array = []

@description('Spread instances over availability zones (regions with zones only).')
param zoneRedundant bool = false

// A bare address is one host.
var restrictions = [for (range, i) in allowedIpRanges: {
  name: 'allowed-${i}'
  ipAddress: contains(range, '/') ? range : '${range}/32'
  action: 'Allow'
  priority: 100 + i
}]

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

resource plan 'Microsoft.Web/serverfarms@2024-11-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    tier: 'FlexConsumption'
    name: 'FC1'
  }
  properties: {
    reserved: true
    zoneRedundant: zoneRedundant
  }
}

var alwaysReady = alwaysReadyInstances > 0 ? [
  {
    name: 'http'
    instanceCount: alwaysReadyInstances
  }
] : []
var httpTriggers = httpPerInstanceConcurrency > 0 ? { http: { perInstanceConcurrency: httpPerInstanceConcurrency } } : null

resource app 'Microsoft.Web/sites@2024-11-01' = {
  name: appName
  location: location
  tags: union(tags, { 'azd-service-name': 'gateway' })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    publicNetworkAccess: inboundAccess == 'private' ? 'Disabled' : 'Enabled'
    virtualNetworkSubnetId: empty(subnetId) ? null : subnetId
    outboundVnetRouting: empty(subnetId) ? null : {
      allTraffic: true
    }
    siteConfig: {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      ftpsState: 'Disabled'
      ipSecurityRestrictions: inboundAccess == 'restricted' ? restrictions : []
      ipSecurityRestrictionsDefaultAction: inboundAccess == 'restricted' ? 'Deny' : 'Allow'
      // Deployment (azd deploy, func publish) goes through the scm endpoint, which accepts Entra ID only (basic
      // publishing credentials are off below); it keeps its own, open, rules so deployments work from anywhere.
      scmIpSecurityRestrictionsUseMain: false
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: deploymentContainerUrl
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
        alwaysReady: alwaysReady
        triggers: httpTriggers
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
  }
}

// Every setting the gateway reads at start-up (shared/config.py) that is not left at its default; tests/test_bicep.py
// keeps this list and the code in step. Flex Consumption takes the runtime from functionAppConfig, so
// FUNCTIONS_WORKER_RUNTIME and FUNCTIONS_EXTENSION_VERSION are absent. This resource replaces all app settings on
// every deployment: add settings through extraAppSettings, not in the portal.
@description('Safety policies (GATEWAY_SAFETY_POLICIES, docs/safety.md); empty for none.')
param safetyPolicies object = {}

@description('Azure AI Content Safety endpoint for the safety policies; empty for none.')
param contentSafetyEndpoint string = ''

@description('Azure AI Language endpoint for the safety policies\' PII detection; empty for none.')
param languageEndpoint string = ''

resource appSettings 'Microsoft.Web/sites/config@2024-11-01' = {
  parent: app
  name: 'appsettings'
  properties: union(extraAppSettings, {
    AzureWebJobsStorage__accountName: storage.name
    AzureWebJobsStorage__credential: 'managedidentity'
    AzureWebJobsStorage__clientId: identityClientId
    APPLICATIONINSIGHTS_CONNECTION_STRING: appInsights.properties.ConnectionString
    APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'Authorization=AAD;ClientId=${identityClientId}'
    AZURE_CLIENT_ID: identityClientId
    PYTHON_ENABLE_INIT_INDEXING: '1'
    GATEWAY_BACKENDS: string(backends)
    GATEWAY_TABLE_ENDPOINT: storage.properties.primaryEndpoints.table
    GATEWAY_LEDGER_ACCOUNTS: join(ledgerAccountEndpoints, ',')
    GATEWAY_BLOB_ENDPOINT: storage.properties.primaryEndpoints.blob
    GATEWAY_INSTANCE_COUNT: string(maximumInstanceCount)
    GATEWAY_LIMIT_FAIL_MODE: limitFailMode
    GATEWAY_ID: gatewayId
    GATEWAY_ENTRA_TENANT_IDS: join(entraTenantIds, ',')
    GATEWAY_ENTRA_AUDIENCES: join(entraAudiences, ',')
    GATEWAY_CONSOLE_EASY_AUTH: empty(consoleSignInClientId) ? 'false' : 'true'
    GATEWAY_SAFETY_POLICIES: string(safetyPolicies)
    GATEWAY_CONTENT_SAFETY_ENDPOINT: contentSafetyEndpoint
    GATEWAY_LANGUAGE_ENDPOINT: languageEndpoint
  })
}

// The console's sign-in (docs/deploy.md): App Service Authentication with Entra ID signs a browser in before /console
// and hands the gateway the user and their app roles in X-MS-CLIENT-PRINCIPAL (it removes any such header a client
// sends), which the gateway believes only with GATEWAY_CONSOLE_EASY_AUTH=true, set above with it. Everything else is
// excluded from the sign-in: the OpenAI paths and /health (consumer keys and Entra tokens decide there, as without Easy
// Auth), and the admin API, which automation calls with the admin key or an Entra ID token (the page's calls carry
// the sign-in session, so Easy Auth still names the user on them). No client secret: the browser gets an ID token
// (the registration allows ID tokens; the administrator turns that on once).
var consoleOpenIdIssuer = '${environment().authentication.loginEndpoint}${consoleSignInTenantId}/v2.0'

resource consoleSignIn 'Microsoft.Web/sites/config@2024-11-01' = if (!empty(consoleSignInClientId)) {
  parent: app
  name: 'authsettingsV2'
  properties: {
    platform: {
      enabled: true
    }
    globalValidation: {
      requireAuthentication: true
      unauthenticatedClientAction: 'RedirectToLoginPage'
      redirectToProvider: 'azureactivedirectory'
      excludedPaths: [
        '/openai/*'
        '/v1/*'
        '/health'
        '/health/*'
        '/console/api/*'
      ]
    }
    identityProviders: {
      azureActiveDirectory: {
        enabled: true
        registration: {
          clientId: consoleSignInClientId
          openIdIssuer: consoleOpenIdIssuer
        }
        validation: {
          allowedAudiences: [
            consoleSignInClientId
            'api://${consoleSignInClientId}'
          ]
        }
      }
    }
    login: {
      tokenStore: {
        enabled: false
      }
    }
    httpSettings: {
      requireHttps: true
    }
  }
}

resource ftpPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-11-01' = {
  parent: app
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-11-01' = {
  parent: app
  name: 'scm'
  properties: {
    allow: false
  }
}

resource diagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-gateway-workspace'
  scope: app
  properties: {
    workspaceId: logAnalyticsId
    logs: [
      {
        categoryGroup: 'allLogs'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

output name string = app.name
output id string = app.id
output defaultHostName string = app.properties.defaultHostName
