// Optional private networking: a virtual network with a subnet for the Function App's virtual network integration
// (delegated to Microsoft.App/environments, as Flex Consumption requires) and a subnet for private endpoints to the
// storage account (blob: host storage and deployment package; table: the gateway's tables) and to every Azure
// OpenAI account, with the private DNS zones that make their public names resolve to the private addresses.

param name string
param location string
param tags object

param addressPrefix string
param appSubnetPrefix string
param privateEndpointSubnetPrefix string

param storageAccountId string

@description('Resource ids of the Azure OpenAI accounts (new and existing) to reach through private endpoints.')
param openAIAccountIds array

var appSubnetName = 'app'
var privateEndpointSubnetName = 'private-endpoints'
var blobZone = 'privatelink.blob.${environment().suffixes.storage}'
var tableZone = 'privatelink.table.${environment().suffixes.storage}'
var openAIZone = 'privatelink.openai.azure.com'
var zones = [
  blobZone
  tableZone
  openAIZone
]
var storageGroups = [
  'blob'
  'table'
]

resource vnet 'Microsoft.Network/virtualNetworks@2023-11-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    addressSpace: {
      addressPrefixes: [
        addressPrefix
      ]
    }
    subnets: [
      {
        name: appSubnetName
        properties: {
          addressPrefix: appSubnetPrefix
          delegations: [
            {
              name: 'flex-consumption'
              properties: {
                serviceName: 'Microsoft.App/environments'
              }
            }
          ]
        }
      }
      {
        name: privateEndpointSubnetName
        properties: {
          addressPrefix: privateEndpointSubnetPrefix
          privateEndpointNetworkPolicies: 'Disabled'
        }
      }
    ]
  }
}

resource dnsZones 'Microsoft.Network/privateDnsZones@2020-06-01' = [for zone in zones: {
  name: zone
  location: 'global'
  tags: tags
}]

resource dnsLinks 'Microsoft.Network/privateDnsZones/virtualNetworkLinks@2020-06-01' = [for (zone, i) in zones: {
  parent: dnsZones[i]
  name: '${name}-link'
  location: 'global'
  tags: tags
  properties: {
    registrationEnabled: false
    virtualNetwork: {
      id: vnet.id
    }
  }
}]

var privateEndpointSubnetId = resourceId('Microsoft.Network/virtualNetworks/subnets', vnet.name, privateEndpointSubnetName)

resource storageEndpoints 'Microsoft.Network/privateEndpoints@2023-11-01' = [for group in storageGroups: {
  name: 'pe-${last(split(storageAccountId, '/'))}-${group}'
  location: location
  tags: tags
  properties: {
    subnet: {
      id: privateEndpointSubnetId
    }
    privateLinkServiceConnections: [
      {
        name: group
        properties: {
          privateLinkServiceId: storageAccountId
          groupIds: [
            group
          ]
        }
      }
    ]
  }
}]

resource storageEndpointDns 'Microsoft.Network/privateEndpoints/privateDnsZoneGroups@2023-11-01' = [for (group, i) in storageGroups: {
  parent: storageEndpoints[i]
  name: 'default'
  properties: {
    privateDnsZoneConfigs: [
      {
        name: group
        properties: {
          privateDnsZoneId: dnsZones[i].id
        }
      }
    ]
  }
}]

resource openAIEndpoints 'Microsoft.Network/privateEndpoints@2023-11-01' = [for accountId in openAIAccountIds: {
  name: take('pe-${uniqueString(accountId)}-${last(split(accountId, '/'))}', 80)
  location: location
  tags: tags
  properties: {
    subnet: {
      id: privateEndpointSubnetId
    }
    privateLinkServiceConnections: [
      {
        name: 'account'
        properties: {
          privateLinkServiceId: accountId
          groupIds: [
            'account'
          ]
        }
      }
    ]
  }
}]

resource openAIEndpointDns 'Microsoft.Network/privateEndpoints/privateDnsZoneGroups@2023-11-01' = [for (accountId, i) in openAIAccountIds: {
  parent: openAIEndpoints[i]
  name: 'default'
  properties: {
    privateDnsZoneConfigs: [
      {
        name: 'openai'
        properties: {
          privateDnsZoneId: dnsZones[2].id
        }
      }
    ]
  }
}]

output vnetId string = vnet.id
output appSubnetId string = resourceId('Microsoft.Network/virtualNetworks/subnets', vnet.name, appSubnetName)
