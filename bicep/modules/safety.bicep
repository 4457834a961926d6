// The safety policies' services (docs/safety.md): an Azure AI Content Safety account and an Azure AI Language account,
// new or existing (by name, in this resource group), and the gateway identity's access to each (Cognitive Services
// User: calls only, no keys). Keys are disabled on new accounts: the gateway signs in with its managed identity.

@description('Kind of account: ContentSafety or TextAnalytics (Language).')
@allowed([
  'ContentSafety'
  'TextAnalytics'
])
param kind string

@description('Name of a new account (also its custom subdomain), or of an existing one in this resource group.')
@minLength(2)
@maxLength(64)
param name string

@description('True to use an existing account of that name; false to create it.')
param existing bool = false

param location string
param tags object

@description('Principal id of the gateway\'s identity.')
param gatewayPrincipalId string

// Built-in role: Cognitive Services User (calls to the service's APIs; no keys, no management).
var cognitiveServicesUser = 'a97b65f3-24c7-4388-baec-2e87135dc908'

resource created 'Microsoft.CognitiveServices/accounts@2024-10-01' = if (!existing) {
  name: name
  location: location
  tags: tags
  kind: kind
  sku: {
    name: 'S0'
  }
  properties: {
    customSubDomainName: name
    disableLocalAuth: true
    publicNetworkAccess: 'Enabled'
  }
}

resource account 'Microsoft.CognitiveServices/accounts@2024-10-01' existing = {
  name: name
}

resource gatewayUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(account.id, gatewayPrincipalId, cognitiveServicesUser)
  scope: account
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', cognitiveServicesUser)
    principalId: gatewayPrincipalId
    principalType: 'ServicePrincipal'
  }
  dependsOn: [
    created
  ]
}

output endpoint string = 'https://${name}.cognitiveservices.azure.com'
