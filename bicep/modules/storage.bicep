// One storage account for the Functions host (AzureWebJobsStorage), the Flex Consumption deployment container and
// the gateway's tables (consumers, ledger, breakers, usage; the app creates them at start-up) and the response cache's
// blobs. Shared keys are off:
// every client, the admin CLI included, authenticates with Microsoft Entra ID.

param name string
param location string
param tags object

@description('Container the Flex Consumption plan deploys the app package to.')
param deploymentContainerName string

@allowed([
  'Standard_LRS'
  'Standard_ZRS'
])
param skuName string = 'Standard_LRS'

@description('True when the account is reached through private endpoints only.')
param privateNetworking bool = false

@description('Public IP addresses or CIDR ranges still allowed in when private networking is on (the admin CLI).')
param allowedIpRanges array = []

@description('Log Analytics workspace that receives the account\'s logs and metrics.')
param logAnalyticsId string

@description('Days an audit blob (docs/safety.md) is kept after its last write.')
@minValue(1)
param auditRetentionDays int = 90

var ipRules = map(allowedIpRanges, range => { value: range, action: 'Allow' })
var privateAcls = { defaultAction: 'Deny', bypass: 'None', ipRules: ipRules }
var publicAcls = { defaultAction: 'Allow', bypass: 'AzureServices' }

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: skuName
  }
  properties: {
    accessTier: 'Hot'
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    allowCrossTenantReplication: false
    publicNetworkAccess: privateNetworking && empty(allowedIpRanges) ? 'Disabled' : 'Enabled'
    networkAcls: privateNetworking ? privateAcls : publicAcls
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

// The response cache's entries (docs/cache.md): the gateway reads each with its own TTL (at most a day); what is never
// read again is deleted here, two days after its last write.
resource cacheContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: 'gateway-cache'
  properties: {
    publicAccess: 'None'
  }
}

// The audit trail of safety policies that audit (docs/safety.md): append blobs, JSON Lines, per consumer and hour;
// deleted auditRetentionDays after their last write.
resource auditContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: 'gateway-audit'
  properties: {
    publicAccess: 'None'
  }
}

resource cacheLifecycle 'Microsoft.Storage/storageAccounts/managementPolicies@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    policy: {
      rules: [
        {
          name: 'response-cache-expiry'
          enabled: true
          type: 'Lifecycle'
          definition: {
            filters: {
              blobTypes: [
                'blockBlob'
              ]
              prefixMatch: [
                '${cacheContainer.name}/'
              ]
            }
            actions: {
              baseBlob: {
                delete: {
                  daysAfterModificationGreaterThan: 2
                }
              }
            }
          }
        }
        {
          name: 'audit-retention'
          enabled: true
          type: 'Lifecycle'
          definition: {
            filters: {
              blobTypes: [
                'appendBlob'
              ]
              prefixMatch: [
                '${auditContainer.name}/'
              ]
            }
            actions: {
              baseBlob: {
                delete: {
                  daysAfterModificationGreaterThan: auditRetentionDays
                }
              }
            }
          }
        }
      ]
    }
  }
}

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

// Transactions and capacity of the account; reads, writes and failures of the host's blobs and the gateway's tables
// (a limiter store outage shows here first).
resource accountDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-gateway-workspace'
  scope: storage
  properties: {
    workspaceId: logAnalyticsId
    metrics: [
      {
        category: 'Transaction'
        enabled: true
      }
    ]
  }
}

resource blobDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-gateway-workspace'
  scope: blobService
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
        category: 'Transaction'
        enabled: true
      }
    ]
  }
}

resource tableDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-gateway-workspace'
  scope: tableService
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
        category: 'Transaction'
        enabled: true
      }
    ]
  }
}

output id string = storage.id
output name string = storage.name
output blobEndpoint string = storage.properties.primaryEndpoints.blob
output tableEndpoint string = storage.properties.primaryEndpoints.table
output deploymentContainerUrl string = '${storage.properties.primaryEndpoints.blob}${deploymentContainer.name}'
