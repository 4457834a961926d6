// Optional private networking: a virtual network with a subnet for the Function App's virtual network integration
// (delegated to Microsoft.App/environments, as Flex Consumption requires; its outbound internet access explicit,
// through a NAT gateway, since new subnets get no default outbound access) and a subnet for private endpoints to the
// storage account (blob: host storage and deployment package; table: the gateway's tables), to every Azure OpenAI
// account and, when the gateway is private, to the Function App itself. Private DNS zones make the public names
// resolve to the private addresses: created and linked here, or brought (existingDnsZoneIds) from a hub.

param name string
param location string
param tags object

param addressPrefix string
param appSubnetPrefix string
param privateEndpointSubnetPrefix string

param storageAccountId string

@description('The Azure OpenAI accounts (new and existing) to reach through private endpoints: [{ id, manualApproval }]. manualApproval sends a connection request the account\'s owner approves instead of approving it (which needs that right on the account).')
param openAIAccounts array

@description('Give the app subnet its outbound internet access through a NAT gateway.')
param createNatGateway bool = true

@description('Existing private DNS zones by key (blob, table, openai, cognitiveservices, sites); the others are created.')
param existingDnsZoneIds object = {}

var appSubnetName = 'app'
var privateEndpointSubnetName = 'private-endpoints'
var zoneNames = {
  blob: 'privatelink.blob.${environment().suffixes.storage}'
  table: 'privatelink.table.${environment().suffixes.storage}'
  // Accounts answer on <name>.openai.azure.com and <name>.cognitiveservices.azure.com; both must resolve privately.
  openai: 'privatelink.openai.azure.com'
  cognitiveservices: 'privatelink.cognitiveservices.azure.com'
  sites: 'privatelink.azurewebsites.net'
}
var givenZoneIds = union({ blob: '', table: '', openai: '', cognitiveservices: '', sites: '' }, existingDnsZoneIds)
var createdZones = filter(items(zoneNames), zone => empty(givenZoneIds[zone.key]))
var zoneIds = toObject(items(zoneNames), zone => zone.key, zone => empty(givenZoneIds[zone.key]) ? resourceId('Microsoft.Network/privateDnsZones', zone.value) : givenZoneIds[zone.key])
var storageGroups = [
  'blob'
  'table'
]
var natName = 'nat-${name}'
var natIpName = 'pip-nat-${name}'

// Private endpoint names: at most 64 characters, ending in a letter or digit whatever the account's name.
var openAIEndpointNames = [for account in openAIAccounts: 'pe-oai-${take(last(split(account.id, '/')), 40)}-${uniqueString(account.id)}']

resource natIp 'Microsoft.Network/publicIPAddresses@2023-11-01' = if (createNatGateway) {
  name: natIpName
  location: location
  tags: tags
  sku: {
    name: 'Standard'
  }
  properties: {
    publicIPAllocationMethod: 'Static'
    publicIPAddressVersion: 'IPv4'
  }
}

resource nat 'Microsoft.Network/natGateways@2023-11-01' = if (createNatGateway) {
  name: natName
  location: location
  tags: tags
  sku: {
    name: 'Standard'
  }
  properties: {
    idleTimeoutInMinutes: 10
    publicIpAddresses: [
      {
        id: natIp.id
      }
    ]
  }
}

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
          // Outbound is explicit: the NAT gateway, or your own route (a firewall) when createNatGateway is false.
          defaultOutboundAccess: false
          natGateway: createNatGateway ? {
            id: resourceId('Microsoft.Network/natGateways', natName)
          } : null
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
          defaultOutboundAccess: false
          privateEndpointNetworkPolicies: 'Disabled'
        }
      }
    ]
  }
  dependsOn: [
    nat
  ]
}

resource dnsZones 'Microsoft.Network/privateDnsZones@2020-06-01' = [for zone in createdZones: {
  name: zone.value
  location: 'global'
  tags: tags
}]

resource dnsLinks 'Microsoft.Network/privateDnsZones/virtualNetworkLinks@2020-06-01' = [for (zone, i) in createdZones: {
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
          privateDnsZoneId: zoneIds[group]
        }
      }
    ]
  }
  dependsOn: [
    dnsZones
  ]
}]

resource openAIEndpoints 'Microsoft.Network/privateEndpoints@2023-11-01' = [for (account, i) in openAIAccounts: {
  name: openAIEndpointNames[i]
  location: location
  tags: tags
  properties: {
    subnet: {
      id: privateEndpointSubnetId
    }
    // Auto-approval needs the approve right on the account, which an existing account's owner may not give: then
    // ARM fails the whole deployment with LinkedAuthorizationFailed. A manual connection waits for the owner.
    privateLinkServiceConnections: account.manualApproval ? [] : [
      {
        name: 'account'
        properties: {
          privateLinkServiceId: account.id
          groupIds: [
            'account'
          ]
        }
      }
    ]
    manualPrivateLinkServiceConnections: account.manualApproval ? [
      {
        name: 'account'
        properties: {
          privateLinkServiceId: account.id
          groupIds: [
            'account'
          ]
          requestMessage: 'AI gateway ${name}: private endpoint for inference calls from the gateway\'s managed identity.'
        }
      }
    ] : []
  }
}]

resource openAIEndpointDns 'Microsoft.Network/privateEndpoints/privateDnsZoneGroups@2023-11-01' = [for (account, i) in openAIAccounts: {
  parent: openAIEndpoints[i]
  name: 'default'
  properties: {
    privateDnsZoneConfigs: [
      {
        name: 'openai'
        properties: {
          privateDnsZoneId: zoneIds.openai
        }
      }
      {
        name: 'cognitiveservices'
        properties: {
          privateDnsZoneId: zoneIds.cognitiveservices
        }
      }
    ]
  }
  dependsOn: [
    dnsZones
  ]
}]

output vnetId string = vnet.id
output appSubnetId string = resourceId('Microsoft.Network/virtualNetworks/subnets', vnet.name, appSubnetName)
output privateEndpointSubnetId string = privateEndpointSubnetId
output sitesZoneId string = zoneIds.sites
output tableZoneId string = zoneIds.table
output manualApprovalEndpoints array = filter(map(range(0, length(openAIAccounts)), i => openAIAccounts[i].manualApproval ? openAIEndpointNames[i] : ''), endpoint => !empty(endpoint))
