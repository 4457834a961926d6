// The gateway's own private endpoint (appInboundAccess private): callers in the network (or peered, or on a VPN)
// reach https://<app>.azurewebsites.net through it; public network access to the app is off.

param name string
param location string
param tags object

@description('Resource id of the Function App.')
param appId string

@description('Subnet of the private endpoints.')
param subnetId string

@description('privatelink.azurewebsites.net zone (created by the network module, or brought).')
param dnsZoneId string

resource endpoint 'Microsoft.Network/privateEndpoints@2023-11-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    subnet: {
      id: subnetId
    }
    privateLinkServiceConnections: [
      {
        name: 'sites'
        properties: {
          privateLinkServiceId: appId
          groupIds: [
            'sites'
          ]
        }
      }
    ]
  }
}

resource endpointDns 'Microsoft.Network/privateEndpoints/privateDnsZoneGroups@2023-11-01' = {
  parent: endpoint
  name: 'default'
  properties: {
    privateDnsZoneConfigs: [
      {
        name: 'sites'
        properties: {
          privateDnsZoneId: dnsZoneId
        }
      }
    ]
  }
}

output id string = endpoint.id
