// One storage account holding a share of the consumers' ledgers (GATEWAY_LEDGER_ACCOUNTS; docs/scale.md, "Consumers
// per storage account"): each ledger lives in the account its key hashes to, so K accounts carry the ledgers' Table
// traffic K ways. Tables only (the app creates its ledger table at start-up), shared keys off, the gateway's identity a
// Storage Table Data Contributor on it, and a table private endpoint with private networking.

param name string
param location string
param tags object

@allowed([
  'Standard_LRS'
  'Standard_ZRS'
])
param skuName string = 'Standard_LRS'

@description('Principal id of the gateway\'s user-assigned identity.')
param gatewayPrincipalId string

@description('True when the account is reached through a private endpoint only.')
param privateNetworking bool = false

@description('Public IP addresses or CIDR ranges still allowed in when private networking is on.')
param allowedIpRanges array = []

@description('With private networking: the subnet of the private endpoints, and the privatelink.table DNS zone.')
param privateEndpointSubnetId string = ''
param tableDnsZoneId string = ''

var storageTableDataContributor = '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
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

resource gatewayTables 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, gatewayPrincipalId, storageTableDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageTableDataContributor)
    principalId: gatewayPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource tableEndpoint 'Microsoft.Network/privateEndpoints@2023-11-01' = if (privateNetworking) {
  name: 'pe-${name}-table'
  location: location
  tags: tags
  properties: {
    subnet: {
      id: privateEndpointSubnetId
    }
    privateLinkServiceConnections: [
      {
        name: 'table'
        properties: {
          privateLinkServiceId: storage.id
          groupIds: [
            'table'
          ]
        }
      }
    ]
  }
}

resource tableEndpointDns 'Microsoft.Network/privateEndpoints/privateDnsZoneGroups@2023-11-01' = if (privateNetworking) {
  parent: tableEndpoint
  name: 'default'
  properties: {
    privateDnsZoneConfigs: [
      {
        name: 'table'
        properties: {
          privateDnsZoneId: tableDnsZoneId
        }
      }
    ]
  }
}

output tableEndpoint string = storage.properties.primaryEndpoints.table
