// Role assignments on the storage account and Application Insights: exactly what each principal uses.
//
// Gateway identity:
//   Storage Blob Data Owner        the Functions host's own storage (AzureWebJobsStorage: leases, keys, container
//                                  creation) and the Flex Consumption deployment container. The host docs require
//                                  Owner, not Contributor, for host storage.
//   Storage Table Data Contributor the gateway's tables (creates them at start-up, reads and writes entities).
//   Monitoring Metrics Publisher   telemetry to Application Insights with local authentication off.
//   Not granted: Storage Queue Data Contributor. Only queue triggers, blob triggers and Durable Functions use host
//   queues; this app has HTTP triggers only.
// Admin (optional, a person or group running `python -m shared.admin`):
//   Storage Table Data Contributor create and rotate consumer keys, read usage.
//   Monitoring Reader              `python -m shared.admin query run ...` against Application Insights.

param storageAccountName string
param appInsightsName string

@description('Principal id of the gateway\'s user-assigned identity.')
param gatewayPrincipalId string

@description('Principal id of an admin to grant table and monitoring read access; empty for none.')
param adminPrincipalId string = ''

@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param adminPrincipalType string = 'User'

// Built-in role definition ids: https://learn.microsoft.com/azure/role-based-access-control/built-in-roles
var storageBlobDataOwner = 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
var storageTableDataContributor = '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
var monitoringMetricsPublisher = '3913510d-42f4-4e42-8a64-420c390055eb'
var monitoringReader = '43d0d8ad-25c7-4714-9337-8ba259a9fe05'

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

resource gatewayBlobOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, gatewayPrincipalId, storageBlobDataOwner)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataOwner)
    principalId: gatewayPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource gatewayTables 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, gatewayPrincipalId, storageTableDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageTableDataContributor)
    principalId: gatewayPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource gatewayMetrics 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, gatewayPrincipalId, monitoringMetricsPublisher)
  scope: appInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', monitoringMetricsPublisher)
    principalId: gatewayPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource adminTables 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(adminPrincipalId)) {
  name: guid(storage.id, adminPrincipalId, storageTableDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageTableDataContributor)
    principalId: adminPrincipalId
    principalType: adminPrincipalType
  }
}

resource adminMonitoringReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(adminPrincipalId)) {
  name: guid(appInsights.id, adminPrincipalId, monitoringReader)
  scope: appInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', monitoringReader)
    principalId: adminPrincipalId
    principalType: adminPrincipalType
  }
}
